#!/usr/bin/env bash
# Runs a test inside a throw-away VM (virtme-ng + QEMU) whose kernel has the
# WireGuard module, so that meshpeer uses kernel WireGuard there.
#
#   run-mesh-in-vm.sh --check
#       Exit 0 if everything needed is there, else print what is missing and
#       exit 2.
#   run-mesh-in-vm.sh --smoke
#       Run tests/vm/smoke.sh in the VM (two namespaces, kernel WireGuard,
#       wg(8), a ping through the tunnel; no meshpeer needed).
#   run-mesh-in-vm.sh TEST_BINARY MESHPEER_BINARY [TEST ARGS...]
#       Run a compiled test binary that holds the mesh scenario in the VM
#       (with CI=true, MESHPEER_EXPECT_BACKEND=kernel, MESHPEER_BIN=
#       MESHPEER_BINARY, --test-threads=1 --nocapture TEST ARGS...), e.g.
#         run-mesh-in-vm.sh target/debug/deps/mesh-HASH target/debug/meshpeer
#       tests/vm_kernel.rs runs its own binary with
#         --ignored --exact three_nodes_in_vm_guest
#
# The guest prints "MPT-VM-RESULT: PASS" or "MPT-VM-RESULT: FAIL ..." as its
# last line and also writes its exit code to a result file in a shared
# directory; this script exits 0 only if both say the test passed.
#
# Environment:
#   MESHPEER_VM_KERNEL   kernel image (default: newest /boot/vmlinuz-* whose
#                        modules include wireguard)
#   VNG                  the vng command (default: vng on PATH, or next to python3's pip)
#   MESHPEER_VM_TIMEOUT  seconds for the whole VM run (default 1500)
#   MESHPEER_VM_MEMORY   guest memory (default 2G)
#   MESHPEER_VM_CPUS     guest CPUs (default 2)
#   MESHPEER_TEST_TIMEOUT_SCALE  deadline multiplier inside the guest
#                        (default 4: no KVM, so the guest is emulated)
#   RUST_LOG, RUST_BACKTRACE   passed to the guest
#
# KVM is not used (--disable-kvm): it does not work on the machines this runs
# on, and software emulation works everywhere (boot takes ~30-60 s).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf 'run-mesh-in-vm: %s\n' "$*" >&2; }

find_vng() {
    if [ -n "${VNG:-}" ]; then [ -x "$VNG" ] && printf '%s\n' "$VNG"; return; fi
    if command -v vng >/dev/null 2>&1; then command -v vng; return 0; fi
    local d
    for py in python3 python; do
        d=$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || continue
        if [ -x "$d/vng" ]; then printf '%s\n' "$d/vng"; return 0; fi
    done
    for d in "$HOME/.local/bin" /usr/local/bin; do
        if [ -x "$d/vng" ]; then printf '%s\n' "$d/vng"; return 0; fi
    done
    return 1
}

# A kernel whose modules (or built-in config) include WireGuard.
find_kernel() {
    if [ -n "${MESHPEER_VM_KERNEL:-}" ]; then printf '%s\n' "$MESHPEER_VM_KERNEL"; return 0; fi
    local k v
    while read -r k; do
        [ -n "$k" ] || continue
        v=${k#/boot/vmlinuz-}
        if [ -d "/lib/modules/$v" ] && { find "/lib/modules/$v" -name 'wireguard.ko*' | grep -q . ||
               grep -qs '^CONFIG_WIREGUARD=y' "/boot/config-$v"; }; then
            printf '%s\n' "$k"; return 0
        fi
    done < <(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r)
    return 1
}

check() {
    local missing=()
    vng_bin=$(find_vng) || missing+=("vng (pip install virtme-ng)")
    kernel=$(find_kernel) || missing+=("a kernel image with the wireguard module (apt-get install linux-image-amd64)")
    if [ -n "${kernel:-}" ] && [ ! -r "$kernel" ]; then missing+=("readable kernel image $kernel"); fi
    command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    command -v busybox >/dev/null 2>&1 || missing+=("a static busybox (apt-get install busybox-static)")
    for t in ip wg ping; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t (iproute2, wireguard-tools, iputils-ping)")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        printf 'MISSING: %s\n' "${missing[@]}"
        return 2
    fi
    return 0
}

mode=${1:-}
case "$mode" in
    --check)
        check || exit 2
        echo "ok: vng=$vng_bin kernel=$kernel"
        exit 0 ;;
    --smoke) shift ;;
    ""|-h|--help)
        sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
        exit 2 ;;
    *)
        if [ $# -lt 2 ]; then echo "usage: $0 TEST_BINARY MESHPEER_BINARY [TEST ARGS...]" >&2; exit 2; fi
        mode=--mesh
        test_bin=$1 meshpeer=$2
        shift 2
        for f in "$test_bin" "$meshpeer"; do
            [ -x "$f" ] || { echo "not an executable: $f" >&2; exit 2; }
        done ;;
esac

if ! check >&2; then
    log "cannot run the VM (see above)"
    exit 2
fi

# Everything the guest runs is copied into a stage directory under /tmp and
# shared read-write with the guest at the same path: the guest's root is the
# host's, read-only, but with tmpfs over some directories (/var/cache, /var/tmp,
# ...), so a cargo target dir or a clone may not be visible there as is.
stage=$(mktemp -d /tmp/mpt-vm.XXXXXX)
cleanup() { rm -rf "$stage"; }
trap cleanup EXIT
cp "$here/guest.sh" "$here/smoke.sh" "$stage/"
if [ "$mode" = --mesh ]; then
    cp "$test_bin" "$stage/test-bin"
    cp "$meshpeer" "$stage/meshpeer"
fi
chmod 755 "$stage"/*

guest_env=(
    "MESHPEER_TEST_TIMEOUT_SCALE=${MESHPEER_TEST_TIMEOUT_SCALE:-4}"
    "RUST_BACKTRACE=${RUST_BACKTRACE:-1}"
)
[ -n "${RUST_LOG:-}" ] && guest_env+=("RUST_LOG=$RUST_LOG")
guest_cmd=(env "${guest_env[@]}" "$stage/guest.sh" "${mode#--}" "$@")
printf -v guest_cmd_str '%q ' "${guest_cmd[@]}"

vm_timeout=${MESHPEER_VM_TIMEOUT:-1500}
vng_cmd=(
    "$vng_bin" --run "$kernel" --disable-kvm --user root
    --memory "${MESHPEER_VM_MEMORY:-2G}" --cpus "${MESHPEER_VM_CPUS:-2}"
    --rwdir "$stage" --cwd "$stage"
    --exec "$guest_cmd_str"
)
log "kernel $kernel, $(basename "$vng_bin") $("$vng_bin" --version 2>/dev/null | head -1)"
log "running: timeout $vm_timeout ${vng_cmd[*]}"
start=$(date +%s)
# vng's stdout and stderr go through one pipe (a FIFO, so that we know the
# pid of `timeout`): vng writes them separately, and two redirections to one
# file can overwrite each other. `timeout` puts itself, vng and QEMU in a
# process group of their own and kills all of it on timeout, or when this
# script is told to stop (SIGTERM/SIGINT/SIGHUP).
mkfifo "$stage/console.fifo"
tee "$stage/console.log" <"$stage/console.fifo" &
tee_pid=$!
timeout --kill-after=30 "$vm_timeout" "${vng_cmd[@]}" </dev/null >"$stage/console.fifo" 2>&1 &
vm_pid=$!
stop_vm() {
    log "interrupted: stopping the VM"
    kill -TERM -- "-$vm_pid" 2>/dev/null || kill -TERM "$vm_pid" 2>/dev/null || true
    wait "$vm_pid" 2>/dev/null
    wait "$tee_pid" 2>/dev/null
    exit 130
}
trap stop_vm TERM INT HUP
set +e
wait "$vm_pid"
vng_rc=$?
wait "$tee_pid"
set -e
trap - TERM INT HUP
took=$(( $(date +%s) - start ))

result=$(cat "$stage/result" 2>/dev/null || echo missing)
marker=no
grep -q '^MPT-VM-RESULT: PASS' "$stage/console.log" && marker=yes
log "VM run took ${took}s: vng exit $vng_rc, guest result $result, PASS marker $marker"
if [ "$vng_rc" = 124 ] || [ "$vng_rc" = 137 ]; then
    log "FAIL: timed out after ${vm_timeout}s"
    exit 1
fi
if [ "$result" = 0 ] && [ "$marker" = yes ]; then
    log "PASS"
    exit 0
fi
log "FAIL"
exit 1
