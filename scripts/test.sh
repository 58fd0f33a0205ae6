#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the real-kernel integration tests
# (network namespaces, veths, bridges, nftables, the reference CNI plugins). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_missing test
# The packaging test (crates/ferrynet/tests/package.rs) builds a .deb with cargo-deb.
. scripts/cargo-deb.sh
ensure_cargo_deb
export CARGO_TERM_COLOR=never
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked --features ferrynet/failpoints -- -D warnings
echo "==> cargo test"
# Integration tests mostly wait on the kernel and child processes: run more than 2 at once.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# Crash points (tests/crash_points.rs) are compiled in for the tests only; releases leave them out.
cargo test --workspace --locked --no-fail-fast --features ferrynet/failpoints -- --test-threads="${FERRYNET_TEST_THREADS:-6}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo's own last line is the doc-tests' count).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
