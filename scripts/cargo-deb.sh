#!/usr/bin/env bash
# cargo-deb, which scripts/package.sh and the packaging test (tests/package.rs) use; installed
# from crates.io into ~/.cargo/bin when missing or older than the version below.
CARGO_DEB_VERSION=3.8.0
ensure_cargo_deb() {
  if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
      [ -x "$d/cargo" ] && export PATH="$d:$PATH"
    done
  fi
  if cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    return 0
  fi
  echo "==> installing cargo-deb $CARGO_DEB_VERSION (crates.io)"
  cargo install --quiet --locked --version "$CARGO_DEB_VERSION" cargo-deb
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_cargo_deb
fi
