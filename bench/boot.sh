#!/usr/bin/env bash
# Cold VM boot to agent ready (`husk vmm boot --until-ready`, 1 vCPU, 128 MiB: husk's own
# boot timer, as in bench/vmm_boot.sh), with the VMM's memory sampled every 0.2 s during
# the boot; and restored start, when husk has a way to start from a snapshot.
#
# Usage: bench/boot.sh RUNS      The caller holds the VM lock (run.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=$1
log=$(mktemp /tmp/husk-bench-boot.XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ready=() own=() guest=() failed=
for run in $(seq "$runs"); do
    bench_log "cold boot $run/$runs (~45 s)"
    "$HUSK_BIN" vmm boot --until-ready --vcpus 1 --mem-mib 128 --timeout 600 >"$log" 2>&1 &
    pid=$!
    own_peak=0 guest_peak=0
    while kill -0 "$pid" 2>/dev/null; do
        rss=$(kib VmRSS "$pid") shmem=$(kib RssShmem "$pid")
        if [ -n "$rss" ] && [ -n "$shmem" ]; then
            if (( rss - shmem > own_peak )); then own_peak=$(( rss - shmem )); fi
            if (( shmem > guest_peak )); then guest_peak=$shmem; fi
        fi
        sleep 0.2
    done
    rc=0
    wait "$pid" || rc=$?
    pid=
    ms=$(sed -n 's/^boot: ready after \([0-9]*\) ms$/\1/p' "$log" | tail -1)
    if [ "$rc" -ne 0 ] || [ -z "$ms" ]; then
        failed="husk vmm boot failed (exit $rc): $(tail -1 "$log")"
        break
    fi
    ready+=("$(awk -v m="$ms" 'BEGIN { printf "%.1f", m / 1000 }')")
    own+=("$(( own_peak / 1024 ))")
    guest+=("$(( guest_peak / 1024 ))")
done

if [ -n "$failed" ] || [ ${#ready[@]} -eq 0 ]; then
    record_na boot-cold "cold boot to agent ready" husk-vm "${failed:-no run}"
else
    record boot-cold "cold boot to agent ready" husk-vm s "${ready[@]}"
    record mem-boot "VMM own RSS (RSS - guest RAM), peak during boot" husk-vm MiB "${own[@]}"
    record mem-boot "guest memory touched (RssShmem), peak during boot" husk-vm MiB "${guest[@]}"
fi

# Restored start: snapshots exist in the library (runtime/src/vmm/snapshot); measured here
# once the CLI can start a VM from one.
if "$HUSK_BIN" vmm --help 2>/dev/null | grep -qiE '^\s+restore\b'; then
    record_na boot-restore "restored start to agent ready" husk-vm "husk vmm restore exists but bench/boot.sh does not drive it yet"
else
    record_na boot-restore "restored start to agent ready" husk-vm "not implemented in the CLI yet (snapshots are library-only: no \`husk vmm restore\`, no template in \`husk run\`)"
fi
