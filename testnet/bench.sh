#!/usr/bin/env bash
# The benchmarks behind testnet/RESULTS.md: scale.toml (mixed topology) at
# 10, 50, 100 and 250 nodes, one after the other. Needs root; takes a while.
#   sudo testnet/bench.sh            # all sizes
#   sudo testnet/bench.sh 50 100     # some sizes
# Reports go to testnet/results/scale-<N>/ (report.json, summary.txt,
# reachability.svg). Extra flags for `testnet run` via TESTNET_FLAGS;
# MESHPEER_PROFILE=release benchmarks an optimized daemon (default: debug,
# what `cargo build` makes), with results in testnet/results/scale-<N>-release/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=${MESHPEER_PROFILE:-debug}
cargo build -p meshpeer-testnet --bin testnet
if [ "$profile" = release ]; then cargo build --release --bin meshpeer; else cargo build --bin meshpeer; fi
# A private copy, so a rebuild during the (long) runs does not change the daemon.
bin=$(mktemp /tmp/meshpeer-bench.XXXXXX)
trap 'rm -f "$bin"' EXIT
cp "target/$profile/meshpeer" "$bin"
chmod 755 "$bin"
echo "meshpeer at $(git rev-parse --short HEAD)$(git diff --quiet -- src || echo ' (+ uncommitted changes in src/)')"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10 50 100 250)
for n in "${sizes[@]}"; do
    out=testnet/results/scale-$n
    if [ "$profile" = release ]; then out=$out-release; fi
    echo "==> $n nodes -> $out"
    # shellcheck disable=SC2086
    target/debug/testnet run --scenario testnet/scenarios/scale.toml --nodes "$n" --out "$out" --meshpeer-bin "$bin" ${TESTNET_FLAGS:-} || echo "(run for $n nodes reported failure; see $out/summary.txt)"
done
