#!/usr/bin/env bash
# Cold VM boot to agent ready (`husk vmm boot --until-ready`, 1 vCPU, 128 MiB: husk's own
# boot timer, as in bench/vmm_boot.sh), with the VMM's memory sampled every 0.2 s during
# the boot; and restored start to agent ready through the CLI: `husk --isolation vm
# create` on a fresh --root (the first create boots cold, saves the root's guest template
# under <root>/@templates/ and restores from it; every later create restores), then
# RESTORES creates/deletes more. For each create the vmm daemon's log
# (<root>/<id>/daemon.log) says "guest agent ready after D (restored from a template)":
# D is the daemon's timer from VM creation (the snapshot's memory already mapped) to the
# agent answering its post-restore refresh. The wall time of the whole `husk create`
# (daemon spawn, snapshot load, share mount, container created in the guest) is a row too.
#
# Usage: bench/boot.sh RUNS [RESTORES]   RESTORES defaults to 5 (0: no restored rows).
#   The caller holds the VM lock (run.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=$1
restores=${2:-5}
work=$(mktemp -d /tmp/husk-bench-boot.XXXXXX)
log=$work/boot.log
export BENCH_CMD_LOG=$work/cmd.log
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    local id
    for id in $("$HUSK_BIN" --root "$work/root" list -q 2>/dev/null); do
        "$HUSK_BIN" --root "$work/root" delete --force "$id" >/dev/null 2>&1 || true
    done
    remove_work "$work"
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

# Restored start through the CLI (see the top of this file).
# secs DURATION: Rust's Debug format of a Duration (628.305229ms, 35.785027939s, 912µs) in s.
secs() {
    awk -v d="$1" 'BEGIN {
        if (d ~ /ms$/) f = 1e-3; else if (d ~ /(µs|us)$/) f = 1e-6; else if (d ~ /ns$/) f = 1e-9; else f = 1
        sub(/[^0-9.]+$/, "", d); printf "%.6f\n", d * f }'
}
restore_label="restored start to agent ready (\`husk create\`, daemon's timer)"
create_label="\`husk --isolation vm create\` from the template, CLI wall time (daemon, restore, share mount, container created in the guest)"
template_label="cold boot to agent ready in the first \`husk create\` (makes the template)"
if [ "$restores" -gt 0 ]; then
    make_bundle "$work/b" true
    restored=() created=() template_boot='' failed=''
    for i in $(seq 0 "$restores"); do
        if [ "$i" = 0 ]; then
            bench_log "restored start: first create on a fresh root (cold boot + template save + restore, ~1 min)"
        else
            bench_log "restored start $i/$restores"
        fi
        id=r$i
        if ! t=$(time_ms "$HUSK_BIN" --root "$work/root" --isolation vm create -b "$work/b" "$id" </dev/null); then
            failed="husk --isolation vm create failed: $(tail -1 "$BENCH_CMD_LOG")"
            break
        fi
        dlog=$work/root/$id/daemon.log
        if [ "$i" = 0 ]; then
            d=$(sed -n 's/.* template .* made: ready after \([0-9.]*[a-zµ]*\),.*/\1/p' "$dlog" | tail -1)
            [ -z "$d" ] || template_boot=$(awk -v s="$(secs "$d")" 'BEGIN { printf "%.1f", s }')
        else
            created+=("$t")
        fi
        d=$(sed -n 's/.*guest agent ready after \([0-9.]*[a-zµ]*\) (restored from a template).*/\1/p' "$dlog" | tail -1)
        if [ -z "$d" ]; then
            failed="create $id did not start from the template: $(grep -m1 -E 'guest agent ready|template' "$dlog" || echo "no ready line in its daemon.log")"
            break
        fi
        restored+=("$(awk -v s="$(secs "$d")" 'BEGIN { printf "%.1f", s * 1000 }')")
        "$HUSK_BIN" --root "$work/root" delete --force "$id" >>"$BENCH_CMD_LOG" 2>&1 || true
    done
    if [ -n "$template_boot" ]; then
        record boot-cold "$template_label" husk-vm s "$template_boot"
    fi
    if [ -n "$failed" ] || [ ${#restored[@]} -eq 0 ]; then
        record_na boot-restore "$restore_label" husk-vm "${failed:-no run}"
        record_na boot-restore "$create_label" husk-vm "${failed:-no run}"
    else
        record boot-restore "$restore_label" husk-vm ms "${restored[@]}"
        if [ ${#created[@]} -gt 0 ]; then
            record boot-restore "$create_label" husk-vm ms "${created[@]}"
        fi
    fi
fi
