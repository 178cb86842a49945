#!/usr/bin/env bash
# Long fuzzing of meshpeer's decoders (see FUZZING.md): each target in turn,
# on one core, at the lowest priority, on the stable toolchain.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 600 s, every target
#
# Working corpora grow in fuzz/corpus/<target>/ (not committed); the
# committed seeds (fuzz/seeds/) and regressions (fuzz/regressions/) are
# read as extra corpus directories. Crashes, timeouts and OOMs land in
# fuzz/artifacts/<target>/. Per-target logs and a summary line each go to
# fuzz/logs/ (not committed). CARGO_TARGET_DIR and FUZZ_CORE (default 1)
# may be set; extra libFuzzer flags go in FUZZ_FLAGS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=${1:-600}
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
core=${FUZZ_CORE:-1}
mkdir -p logs
nice -n 19 cargo fuzz build -s none || exit 1
for t in "${targets[@]}"; do
    max_len=8192
    [ "$t" = gossip_state ] && max_len=20000
    mkdir -p "corpus/$t" "regressions/$t" "logs/$t"
    echo "== $t: $secs s on core $core"
    start=$(date +%s)
    # -jobs=1 -workers=1: one worker process, whose output libFuzzer writes
    # to fuzz-0.log in the working directory (logs/<target>/).
    (cd "logs/$t" && nice -n 19 taskset -c "$core" cargo fuzz run -s none \
        --fuzz-dir ../.. "$t" "../../corpus/$t" "../../seeds/$t" "../../regressions/$t" -- \
        -jobs=1 -workers=1 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -max_len="$max_len" -print_final_stats=1 -artifact_prefix="../../artifacts/$t/" \
        ${FUZZ_FLAGS:-}) > "logs/$t/cargo.log" 2>&1
    rc=$?
    log="logs/$t/fuzz-0.log"
    {
        printf '%s rc=%s wall=%ss ' "$t" "$rc" "$(( $(date +%s) - start ))"
        grep -E '^#[0-9]+' "$log" | tail -1 | tr -s ' ' | tr '\n' ' '
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|slowest_unit_time_sec)' "$log" | tr '\n' ' '
        printf 'corpus_files=%s\n' "$(ls "corpus/$t" | wc -l)"
    } | tee -a logs/summary.txt
    grep -E 'ERROR: libFuzzer|panicked|SUMMARY|Test unit written' "$log" | head -5
done
