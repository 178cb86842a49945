#!/usr/bin/env bash
# Runs inside the virtme-ng VM (started by run-mesh-in-vm.sh), as root, from
# the stage directory shared with the host.
#
#   guest.sh smoke             run smoke.sh
#   guest.sh mesh [ARGS...]    run ./test-bin ARGS (a test binary holding the
#                              mesh scenario) with MESHPEER_BIN=./meshpeer,
#                              expecting kernel WireGuard
#
# Writes its exit code to ./result and prints "MPT-VM-RESULT: PASS|FAIL" last.
set -uo pipefail

stage=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rc=1
finish() {
    echo "$rc" > "$stage/result"
    if [ "$rc" -eq 0 ]; then
        echo "MPT-VM-RESULT: PASS"
    else
        echo "MPT-VM-RESULT: FAIL (exit $rc)"
    fi
    exit "$rc"
}
trap finish EXIT

read -r up _ < /proc/uptime
echo "guest: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo), booted in ${up}s"

for m in wireguard veth bridge; do
    modprobe "$m" 2>/dev/null || true    # fine if built in
done
if [ ! -d /sys/module/wireguard ]; then
    echo "guest: no wireguard module in this kernel"; modprobe wireguard; rc=3; exit
fi
for t in ip wg ping; do
    command -v "$t" >/dev/null || { echo "guest: $t not found"; rc=3; exit; }
done
mkdir -p /run/netns /var/run/wireguard

mode=${1:-}
shift || true
case "$mode" in
    smoke)
        "$stage/smoke.sh"
        rc=$? ;;
    mesh)
        # CI=true: the test must not skip in here.
        env CI=true MESHPEER_EXPECT_BACKEND=kernel MESHPEER_BIN="$stage/meshpeer" \
            "$stage/test-bin" --test-threads=1 --nocapture "$@"
        rc=$? ;;
    *)
        echo "guest: unknown mode '$mode'"; rc=2 ;;
esac
read -r up _ < /proc/uptime
echo "guest: $mode finished with exit $rc at uptime ${up}s"
