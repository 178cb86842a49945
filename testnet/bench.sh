#!/usr/bin/env bash
# The benchmarks behind testnet/RESULTS.md: scale.toml (mixed topology) at
# 10, 40, 100 and 250 nodes, one after the other. Needs root; takes a while.
#   sudo testnet/bench.sh                      # all sizes
#   sudo testnet/bench.sh 40 100               # some sizes
#   sudo testnet/bench.sh --topology flat 40   # all public
#   sudo testnet/bench.sh --compare nebula 40  # nebula on the same topology, same run
#   sudo testnet/bench.sh --out DIR 40         # reports under DIR
# Reports go to target/testnet/bench/scale-<topology>-<N>/ (report.json, summary.txt,
# reachability.svg), or under --out DIR / $TESTNET_BENCH_OUT; run output
# never goes into git. Extra flags for `testnet run` via TESTNET_FLAGS;
# MESHPEER_PROFILE=release benchmarks an optimized daemon (default: debug,
# what `cargo build` makes), with results in scale-<N>-release/.
# Binaries are taken from $CARGO_TARGET_DIR (default target/).
# Idle figures of several sizes in one plot afterwards:
#   target/debug/testnet plot-idle target/testnet/bench/scale-*/report.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_root=${TESTNET_BENCH_OUT:-target/testnet/bench}
sizes=()
topology=mixed
flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out_root=$2; shift 2 ;;
        --out=*) out_root=${1#--out=}; shift ;;
        --topology) topology=$2; shift 2 ;;
        --compare) flags+=(--compare "$2"); shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) sizes+=("$1"); shift ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(10 40 100 250)
profile=${MESHPEER_PROFILE:-debug}
target=${CARGO_TARGET_DIR:-target}
cargo build -p meshpeer-testnet --bin testnet
if [ "$profile" = release ]; then cargo build --release --bin meshpeer; else cargo build --bin meshpeer; fi
# A private copy, so a rebuild during the (long) runs does not change the daemon.
bin=$(mktemp /tmp/meshpeer-bench.XXXXXX)
trap 'rm -f "$bin"' EXIT
cp "$target/$profile/meshpeer" "$bin"
chmod 755 "$bin"
echo "meshpeer at $(git rev-parse --short HEAD)$(git diff --quiet -- src || echo ' (+ uncommitted changes in src/)')"
for n in "${sizes[@]}"; do
    out=$out_root/scale-$topology-$n
    if [ "$profile" = release ]; then out=$out-release; fi
    echo "==> $n nodes -> $out"
    # shellcheck disable=SC2086
    "$target/debug/testnet" run --scenario testnet/scenarios/scale.toml --topology "$topology" --nodes "$n" --out "$out" --meshpeer-bin "$bin" "${flags[@]}" ${TESTNET_FLAGS:-} || echo "(run for $n nodes reported failure; see $out/summary.txt)"
done
