#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the real-kernel integration tests
# (network namespaces, veths, bridges, nftables, the reference CNI plugins). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_missing test
export CARGO_TERM_COLOR=never
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
# Integration tests mostly wait on the kernel and child processes: run more than 2 at once.
cargo test --workspace --locked -- --test-threads="${FERRYNET_TEST_THREADS:-6}"
