#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60), or for RUNS
# executions each with FUZZ_RUNS=N. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Corpora live in fuzz/corpus/<target> (not committed); seeds
# in fuzz/seeds/<target> when present. A crash stops the run and leaves its input in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
targets=$(cargo +nightly fuzz list)
for t in $targets; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    if [ -n "${FUZZ_RUNS:-}" ]; then
        limit=(-runs="$FUZZ_RUNS")
    else
        limit=(-max_total_time="$secs")
    fi
    echo "==> $t"
    cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- "${limit[@]}" -print_final_stats=1 2>&1 \
        | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|Done|INFO: Loaded)" || true
    if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
        echo "!! $t: crash inputs in fuzz/artifacts/$t" >&2
        exit 1
    fi
done
