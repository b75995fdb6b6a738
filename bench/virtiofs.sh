#!/usr/bin/env bash
# virtio-fs sequential write and read vs the host: the same busybox script writes a
# 16 MiB file with dd (bs=1M, conv=fsync), then reads it back twice (bs=1M), timed with
# /proc/uptime (10 ms resolution), once in a husk vm container on its virtio-fs rootfs and
# once on the host in the same rootfs directory. The file is read right after it was
# written, so the host's page cache is warm in both cases: the read row measures the
# transport (guest kernel, FUSE over virtio, virtiofsd), not the disk.
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
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints "WRITE_S READ_S" (seconds, from /proc/uptime).
script="u() { cut -d' ' -f1 /proc/uptime; }
a=\$(u); dd if=/dev/zero of=bench.dat bs=1M count=$mib conv=fsync 2>/dev/null; b=\$(u)
for i in 1 2; do dd if=bench.dat of=/dev/null bs=1M 2>/dev/null; done; c=\$(u); rm -f bench.dat
echo \$a \$b \$c | awk '{ printf \"%.2f %.2f\\n\", \$2 - \$1, \$3 - \$2 }'"
make_bundle "$work/b" sh -c "cd / && $script"
python3 - "$work/b/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["root"]["readonly"] = False
json.dump(c, open(p, "w"), indent=2)
PY

# MiB/s from a duration in seconds.
rate() { awk -v s="$1" -v m="$(( mib * ${2:-1} ))" 'BEGIN { if (s <= 0) s = 0.01; printf "%.0f", m / s }'; }
declare -A w r
failed=
for run in $(seq "$runs"); do
    bench_log "virtio-fs run $run/$runs: host, then a husk vm container (~45 s boot)"
    read -r hw hr < <(cd "$work/b/rootfs" && busybox sh -c "$script")
    w[host]+="$(rate "$hw") "; r[host]+="$(rate "$hr" 2) "
    if [ -z "$failed" ]; then
        if out=$("$HUSK_BIN" --root "$work/root" --isolation vm run -b "$work/b" "vfs$run" 2>>"$BENCH_CMD_LOG") && [ -n "$out" ]; then
            read -r gw gr <<<"$(echo "$out" | tail -1)"
            w[vm]+="$(rate "$gw") "; r[vm]+="$(rate "$gr" 2) "
        else
            failed="husk --isolation vm run failed: $(tail -1 "$BENCH_CMD_LOG")"
        fi
    fi
done
# shellcheck disable=SC2086
record vfs-write "sequential write, $mib MiB, dd bs=1M conv=fsync" host MiB/s ${w[host]}
# shellcheck disable=SC2086
record vfs-read "sequential read, $mib MiB x 2, dd bs=1M (page cache warm)" host MiB/s ${r[host]}
if [ -n "$failed" ]; then
    record_na vfs-write "sequential write, $mib MiB, dd bs=1M conv=fsync" "husk-vm (virtio-fs)" "$failed"
    record_na vfs-read "sequential read, $mib MiB x 2, dd bs=1M (page cache warm)" "husk-vm (virtio-fs)" "$failed"
else
    # shellcheck disable=SC2086
    record vfs-write "sequential write, $mib MiB, dd bs=1M conv=fsync" "husk-vm (virtio-fs)" MiB/s ${w[vm]}
    # shellcheck disable=SC2086
    record vfs-read "sequential read, $mib MiB x 2, dd bs=1M (page cache warm)" "husk-vm (virtio-fs)" MiB/s ${r[vm]}
fi
