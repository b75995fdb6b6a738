#!/usr/bin/env bash
# virtio-fs sequential write and read vs the host: the same busybox script writes a
# 16 MiB file with dd (bs=1M, conv=fsync), then reads it back twice (bs=1M), timed with
# /proc/uptime (10 ms resolution), once in a husk vm container on its virtio-fs rootfs and
# once on the host in the same rootfs directory. The file is read right after it was
# written, so the host's page cache is warm in both cases: the read row measures the
# transport (guest kernel, FUSE over virtio, virtiofsd), not the disk.
#
# The guest runs are `husk --isolation vm create` (the first on the fresh root boots cold
# and makes the template, later ones restore from it), then `husk start`; the script in the
# guest gets VFS_TIMEOUT seconds (default 240) from `start`. A run past it is deleted and
# its unfinished rows say "n/a: timed out" (a write that finished before is still kept).
#
# Usage: bench/virtiofs.sh RUNS   The caller holds the VM lock (run.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=$1
mib=16
work=$(mktemp -d /tmp/husk-bench-vfs.XXXXXX)
export BENCH_CMD_LOG=$work/cmd.log
cleanup() {
    local id
    for id in $("$HUSK_BIN" --root "$work/root" list -q 2>/dev/null); do
        "$HUSK_BIN" --root "$work/root" delete --force "$id" >/dev/null 2>&1 || true
    done
    remove_work "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints "w WRITE_S" once the write is done, then "r READ_S" (seconds, from /proc/uptime),
# so a run stopped by the timeout still has its write figure.
script="u() { cut -d' ' -f1 /proc/uptime; }
a=\$(u); dd if=/dev/zero of=bench.dat bs=1M count=$mib conv=fsync 2>/dev/null; b=\$(u)
echo \$a \$b | awk '{ printf \"w %.2f\\n\", \$2 - \$1 }'
for i in 1 2; do dd if=bench.dat of=/dev/null bs=1M 2>/dev/null; done; c=\$(u); rm -f bench.dat
echo \$b \$c | awk '{ printf \"r %.2f\\n\", \$2 - \$1 }'"
make_bundle "$work/b" sh -c "cd / && $script"
python3 - "$work/b/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["root"]["readonly"] = False
json.dump(c, open(p, "w"), indent=2)
PY

limit=${VFS_TIMEOUT:-240}
# MiB/s from a duration in seconds.
# Two decimals below 10 MiB/s (the guest's rates here are around 1 MiB/s).
rate() { awk -v s="$1" -v m="$(( mib * ${2:-1} ))" 'BEGIN { if (s <= 0) s = 0.01; r = m / s; printf (r < 10 ? "%.2f" : "%.0f"), r }'; }
# field TAG FILE: the figure of the line "TAG SECONDS" in FILE (empty if none).
field() { awk -v t="$1" '$1 == t { v = $2 } END { print v }' "$2" 2>/dev/null; }
# status ID: the container's OCI status (empty if husk does not know it).
status() { "$HUSK_BIN" --root "$work/root" state "$1" 2>/dev/null | sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' | head -1; }

# guest_run ID: runs the script in a husk vm container; sets gw/gr (seconds, empty if that
# part did not finish) and vm_failed (why nothing more can be measured in the guest).
guest_run() {
    local id=$1 out=$work/out-$1 t0 st
    gw='' gr=''
    if ! "$HUSK_BIN" --root "$work/root" --isolation vm create -b "$work/b" "$id" >"$out" 2>>"$BENCH_CMD_LOG" </dev/null; then
        vm_failed="husk --isolation vm create failed: $(tail -1 "$BENCH_CMD_LOG")"
        return
    fi
    bench_log "  $id: $(sed -n 's/.*guest agent ready after \(.*\)$/agent ready after \1/p' "$work/root/$id/daemon.log" | tail -1)"
    if ! "$HUSK_BIN" --root "$work/root" start "$id" >>"$BENCH_CMD_LOG" 2>&1 </dev/null; then
        vm_failed="husk start failed: $(tail -1 "$BENCH_CMD_LOG")"
    else
        t0=$(now_us)
        while :; do
            st=$(status "$id")
            [ "$st" = running ] || [ "$st" = created ] || break
            if (( ($(now_us) - t0) / 1000000 >= limit )); then
                gw=$(field w "$out")
                vm_failed="timed out: the guest script had not finished $limit s after \`husk start\` ($( [ -n "$gw" ] && echo "the write took $gw s, the $((2 * mib)) MiB read did not finish" || echo "the $mib MiB write did not finish"))"
                break
            fi
            sleep 1
        done
    fi
    gw=$(field w "$out") gr=$(field r "$out")
    if [ -z "$vm_failed" ] && [ -z "$gr" ]; then
        vm_failed="the guest script ended without its figures (status ${st:-?}; output: $(tr '\n' ' ' <"$out" | cut -c1-200))"
    fi
    "$HUSK_BIN" --root "$work/root" delete --force "$id" >>"$BENCH_CMD_LOG" 2>&1 || true
}

declare -A w r
vm_failed=
for run in $(seq "$runs"); do
    bench_log "virtio-fs run $run/$runs: host, then a husk vm container (cold boot + template the first time; timeout $limit s after start)"
    (cd "$work/b/rootfs" && busybox sh -c "$script") >"$work/host.out"
    hw=$(field w "$work/host.out") hr=$(field r "$work/host.out")
    w[host]+="$(rate "$hw") "; r[host]+="$(rate "$hr" 2) "
    if [ -z "$vm_failed" ]; then
        guest_run "vfs$run"
        [ -z "$gw" ] || w[vm]+="$(rate "$gw") "
        [ -z "$gr" ] || r[vm]+="$(rate "$gr" 2) "
        bench_log "  guest: write ${gw:-?} s, read ${gr:-?} s${vm_failed:+ ($vm_failed)}"
    fi
done
wlabel="sequential write, $mib MiB, dd bs=1M conv=fsync"
rlabel="sequential read, $mib MiB x 2, dd bs=1M (page cache warm)"
# shellcheck disable=SC2086
record vfs-write "$wlabel" host MiB/s ${w[host]}
# shellcheck disable=SC2086
record vfs-read "$rlabel" host MiB/s ${r[host]}
vm="husk-vm (virtio-fs)"
if [ -n "${w[vm]:-}" ]; then
    # shellcheck disable=SC2086
    record vfs-write "$wlabel" "$vm" MiB/s ${w[vm]}
else
    record_na vfs-write "$wlabel" "$vm" "$vm_failed"
fi
if [ -n "${r[vm]:-}" ]; then
    # shellcheck disable=SC2086
    record vfs-read "$rlabel" "$vm" MiB/s ${r[vm]}
else
    record_na vfs-read "$rlabel" "$vm" "$vm_failed"
fi
if [ -n "$vm_failed" ] && { [ -n "${w[vm]:-}" ] || [ -n "${r[vm]:-}" ]; }; then
    bench_log "note: the guest rows have fewer runs than the host's: $vm_failed"
fi
