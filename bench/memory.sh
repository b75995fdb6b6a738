#!/usr/bin/env bash
# Memory per running sandbox: K husk vm containers running `sleep`, started one after the
# other with `husk run -d` on one fresh --root: the first makes the root's guest template
# (cold boot, save) and restores from it, every later one restores from the template
# (how each started is read from its daemon.log and logged). Once all K run, per sandbox:
# the VMM daemon's own RSS (VmRSS - RssShmem), guest memory touched (RssShmem: guest RAM
# is a shared memfd, also when restored: the snapshot's pages are copied into it for
# virtiofsd), virtiofsd's RSS (all its processes) and the PSS of both. RSS counts shared
# pages (binary text) once per process. A runc container running the same `sleep` is
# measured alongside for scale.
#
# Usage: bench/memory.sh K     The caller holds the VM lock (run.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

k=$1
work=$(mktemp -d /tmp/husk-bench-mem.XXXXXX)
export BENCH_CMD_LOG=$work/cmd.log
cleanup() {
    local id
    for id in $("$HUSK_BIN" --root "$work/root" list -q 2>/dev/null); do
        "$HUSK_BIN" --root "$work/root" delete --force "$id" >/dev/null 2>&1 || true
    done
    runc --root "$work/runc" delete --force memref >/dev/null 2>&1 || true
    remove_work "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_bundle "$work/b" sleep 3600

# descendants PID: every process under PID.
descendants() {
    local c
    # shellcheck disable=SC2013 # the files hold space-separated pids
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$c"; descendants "$c"; done
}

# sandbox_virtiofsd DAEMON_PID SANDBOX_DIR: the virtiofsd processes of one sandbox. An
# unjailed daemon's are its descendants; a jailed vmm's were started by its launcher, which
# has exited, so they are found by the sandbox directory in their command line.
sandbox_virtiofsd() {
    local c
    {
        for c in $(descendants "$1"); do
            [ "$(cat /proc/"$c"/comm 2>/dev/null)" = virtiofsd ] && echo "$c"
        done
        for c in $(pgrep -x virtiofsd); do
            tr '\0' ' ' <"/proc/$c/cmdline" 2>/dev/null | grep -qF -- "$2" && echo "$c"
        done
    } | sort -u || true
}

key=mem-$k
# One after the other: 4 cold boots together on 2 PVM cores passed husk's 300 s create
# timeout; from the template each later start takes seconds.
if [ "$k" = 1 ]; then
    how="1 sandbox (restored from the template its create made)"
else
    how="$k sandboxes started one after the other (the first made the template, all restored from it), all running"
fi
failed=
starts=()
for i in $(seq "$k"); do
    if [ "$i" = 1 ]; then
        bench_log "starting husk vm sandbox 1/$k (cold boot + template save + restore, ~1 min)"
    else
        bench_log "starting husk vm sandbox $i/$k (from the root's template)"
    fi
    if ! t=$(time_ms "$HUSK_BIN" --root "$work/root" --isolation vm run -d -b "$work/b" --pid-file "$work/pid$i" "m$i" </dev/null); then
        failed="husk run -d --isolation vm failed (sandbox $i of $k): $(tail -1 "$BENCH_CMD_LOG")"
        break
    fi
    started=$(sed -n 's/.*guest agent ready after .* (\(.*\))$/\1/p' "$work/root/m$i/daemon.log" 2>/dev/null | tail -1)
    starts+=("m$i: ${started:-?} ($t ms)")
done
if [ -n "$failed" ]; then
    for what in "VMM own RSS" "virtiofsd RSS" "guest memory touched" "PSS of VMM + virtiofsd (guest RAM included)"; do
        record_na "$key" "$what, $how, per sandbox" husk-vm "$failed"
    done
    exit 0
fi
bench_log "all $k running; how each started: ${starts[*]}"
sleep 3
own=() vfs=() guest=() pss=()
# Proportional set size: a page shared by N processes counts 1/N in each, so what the
# sandboxes share (binaries, and template pages if they were shared) counts once overall.
pss_kib() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
for i in $(seq "$k"); do
    d=$(cat "$work/pid$i")
    rss=$(kib VmRSS "$d") shmem=$(kib RssShmem "$d")
    bench_log "m$i daemon $d: VmRSS $rss kB = RssAnon $(kib RssAnon "$d") + RssFile $(kib RssFile "$d") + RssShmem $shmem"
    own+=("$(( (rss - shmem) / 1024 ))")
    guest+=("$(( shmem / 1024 ))")
    v=0 p=$(pss_kib "$d")
    for c in $(sandbox_virtiofsd "$d" "$work/root/m$i/"); do
        v=$(( v + $(kib VmRSS "$c") ))
        p=$(( p + $(pss_kib "$c") ))
    done
    vfs+=("$(awk -v v="$v" 'BEGIN { printf "%.1f", v / 1024 }')")
    pss+=("$(awk -v v="$p" 'BEGIN { printf "%.1f", v / 1024 }')")
done
record "$key" "VMM own RSS, $how, per sandbox" husk-vm MiB "${own[@]}"
record "$key" "virtiofsd RSS, $how, per sandbox" husk-vm MiB "${vfs[@]}"
record "$key" "guest memory touched, $how, per sandbox" husk-vm MiB "${guest[@]}"
record "$key" "PSS of VMM + virtiofsd (guest RAM included), $how, per sandbox" husk-vm MiB "${pss[@]}"

if [ "$k" = 1 ]; then
    runc --root "$work/runc" run -d -b "$work/b" --pid-file "$work/runc.pid" memref >>"$BENCH_CMD_LOG" 2>&1 </dev/null
    sleep 1
    r=$(kib VmRSS "$(cat "$work/runc.pid")")
    record "$key" "container process RSS (no VMM), 1 sandbox" runc MiB "$(awk -v v="$r" 'BEGIN { printf "%.1f", v / 1024 }')"
fi
