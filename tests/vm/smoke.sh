#!/usr/bin/env bash
# Smoke test for the VM environment (no meshpeer needed): two network
# namespaces joined by a veth pair, a kernel WireGuard device in each, and a
# ping across the WireGuard tunnel. Proves that modprobe, ip netns, veth and
# wireguard-tools all work where the mesh test is going to run.
#
# Usage: tests/vm/smoke.sh            (as root; inside the VM or on any host
#                                      whose kernel has the wireguard module)
# Prints "MPT-SMOKE-RESULT: PASS" or "MPT-SMOKE-RESULT: FAIL" as its last line.
set -euo pipefail

A=mpt-sa
B=mpt-sb

cleanup() {
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
}
result() {
    local rc=$?
    cleanup
    if [ "$rc" -eq 0 ]; then
        echo "MPT-SMOKE-RESULT: PASS"
    else
        echo "MPT-SMOKE-RESULT: FAIL (exit $rc)"
    fi
    exit "$rc"
}
trap result EXIT

echo "kernel: $(uname -r)"
modprobe wireguard
modprobe veth || true   # may be built in
cleanup

ip netns add "$A"
ip netns add "$B"
ip -n "$A" link set lo up
ip -n "$B" link set lo up
ip link add mpt-sva netns "$A" type veth peer name mpt-svb netns "$B"
ip -n "$A" addr add 10.98.0.1/24 dev mpt-sva
ip -n "$B" addr add 10.98.0.2/24 dev mpt-svb
ip -n "$A" link set mpt-sva up
ip -n "$B" link set mpt-svb up

ka=$(wg genkey); kb=$(wg genkey)
pa=$(printf '%s' "$ka" | wg pubkey); pb=$(printf '%s' "$kb" | wg pubkey)
tmp=$(mktemp -d)
printf '%s' "$ka" > "$tmp/a.key"; printf '%s' "$kb" > "$tmp/b.key"

ip -n "$A" link add wgt0 type wireguard
ip -n "$B" link add wgt0 type wireguard
ip netns exec "$A" wg set wgt0 listen-port 51820 private-key "$tmp/a.key" \
    peer "$pb" endpoint 10.98.0.2:51820 allowed-ips 10.97.0.2/32
ip netns exec "$B" wg set wgt0 listen-port 51820 private-key "$tmp/b.key" \
    peer "$pa" endpoint 10.98.0.1:51820 allowed-ips 10.97.0.1/32
ip -n "$A" addr add 10.97.0.1/24 dev wgt0
ip -n "$B" addr add 10.97.0.2/24 dev wgt0
ip -n "$A" link set wgt0 up
ip -n "$B" link set wgt0 up
rm -rf "$tmp"

ip netns exec "$A" ping -c3 -i0.2 -W2 10.97.0.2
ip netns exec "$B" ping -c3 -i0.2 -W2 10.97.0.1
ip netns exec "$A" wg show wgt0
# a completed handshake shows up as "latest handshake"
ip netns exec "$A" wg show wgt0 latest-handshakes | awk '$2 == 0 { exit 1 }'
