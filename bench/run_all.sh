#!/usr/bin/env bash
# Runs every single-host benchmark beside its anchors and writes bench/results/*.md. As root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_missing bench
cargo build --release --locked -p ferrynet -p connrate
mkdir -p bench/results
for b in latency ports throughput; do
  echo "==> $b"
  python3 bench/bench.py "$b" | tee "bench/results/$b.md"
done
