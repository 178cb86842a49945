#!/usr/bin/env bash
# The newcomer's first command: installs what the testnet needs (Debian
# packages), builds meshpeer and the testnet, and runs a ~20-node demo mesh
# on a mixed internet (public hosts, home NATs, CGNAT, symmetric NAT) with one
# kill -9 and one graceful leave. Ends with one node's `meshpeer status` table
# and where the report and plot were written.
#   sudo testnet/demo.sh [more `testnet run` flags, e.g. --compare nebula]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: needs root (network namespaces); run: sudo $0 $*" >&2
    exit 1
fi
need=()
for p in ip:iproute2 nft:nftables conntrack:conntrack; do
    command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p##*:}")
done
if [[ " $* " == *" nebula "* ]] && ! command -v nebula >/dev/null 2>&1; then
    need+=(nebula)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "==> apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
echo "==> building meshpeer and the testnet"
cargo build --workspace --bins 2>&1 | tail -n 3
echo "==> running testnet/scenarios/demo.toml"
exec target/debug/testnet run --scenario testnet/scenarios/demo.toml "$@"
