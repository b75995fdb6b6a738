#!/usr/bin/env bash
# husk benchmarks, one entry point: measures husk (vm and container isolation) side by side
# with runc and crun on this machine, in one run, alternating runtimes, several runs each,
# and writes the medians, spread and ratios against runc to docs/perf.md. It prints
# figures; it never fails on a time.
#
# Usage: bench/run.sh [--quick] [--out FILE] [--help]
#   --quick     a few minutes: fewer runs; of the VM rows only one cold boot
#   --out FILE  where to write the Markdown report (default docs/perf.md)
#   --render TSV  measure nothing: render a results file kept by an earlier run
# Environment: HUSK_BIN, the husk to measure (default target/debug/husk; e.g.
#   HUSK_BIN=target/release/husk after `cargo build --release -p husk -p
#   containerd-shim-husk-v2`: the shim next to it is used too). Each script also runs
#   alone (see its header); it appends rows to $BENCH_RESULTS when that is set.
#
# Measurements (one script each, all sourcing bench/lib.sh):
#   bench/start.sh     start to first output and full `run` of `true`: husk-vm,
#                      husk-container, runc, crun (crun in a private mount namespace that
#                      hides cgroup2's controllers file: see crun_ns_start in lib.sh)
#   bench/boot.sh      cold boot to agent ready (+ VMM memory during boot), restored start
#                      (husk create from the root's guest template, the daemon's timer)
#   bench/memory.sh    memory per running sandbox (VMM, virtiofsd, guest), 1 and 4 sandboxes
#   bench/engines.sh   `ctr run` and `docker run` end to end, husk vs runc
#   bench/virtiofs.sh  virtio-fs sequential write/read vs the host
#   bench/net.sh       TCP throughput (iperf3) and connect latency container <-> peer netns
# A row whose prerequisite is missing is written as "n/a: reason"; the others still run.
#
# Every guest boot needs /tmp/husk-vm.lock: the full run holds it throughout (one lock
# wait, quieter figures), --quick only around its cold boot. Builds and tests of other
# engineers may still use the 2 cores (the report gives the load average).
set -euo pipefail
# The whole script is one { ... } block, so bash reads it completely before running it:
# editing this file during a (long) run cannot change what the run does.
{

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

quick=
out=
render_only=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out) out=$2; shift ;;
        --render) render_only=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
out=${out:-$BENCH_REPO/docs/perf.md}
cd "$BENCH_REPO"

commit=$(git rev-parse --short HEAD)
# Uncommitted source changes are in the measured binary only if they are older than it
# (other engineers edit the same tree while a run is going on).
changed=$(git diff --name-only HEAD -- runtime guest-agent shim rootfs-builder 2>/dev/null || true)
if [ -n "$changed" ]; then
    newer=$(cd "$BENCH_REPO" && for f in $changed; do if [ ! -e "$f" ] || [ "$f" -nt "$HUSK_BIN" ]; then echo "$f"; fi; done)
    if [ -z "$newer" ]; then
        commit="$commit (+ uncommitted changes in the source, built into $(basename "$HUSK_BIN"))"
    elif [ "$(echo "$newer" | wc -l)" = "$(echo "$changed" | wc -l)" ]; then
        commit="$commit (the tree's uncommitted source changes are all newer than the binary: not in it)"
    else
        commit="$commit (+ some uncommitted changes in the source; others are newer than the binary)"
    fi
fi

# Which husk build ran (HUSK_BIN, see lib.sh), for the report.
build_note() {
    local dir
    dir=$(basename "$(dirname "$HUSK_BIN")")
    case "$dir" in
        release) echo "release build of \`husk\` and its shim (\`target/release\`, HUSK_BIN)" ;;
        debug) echo "debug build of \`husk\` (\`target/debug\`)" ;;
        *) echo "\`husk\` from \`$HUSK_BIN\`" ;;
    esac
}

# Markdown: one table per group; ratio = median / median of runc (else host) of the same
# measurement.
render() {
    cat <<EOF
# husk performance figures

Written by \`bench/run.sh${quick:+ --quick}\` (see bench/README.md); do not edit by hand.
Medians of alternating runs (runtimes interleaved in each round) with their spread
(min - max); ratio = median / median of runc (host for virtio-fs) for the same measurement.
Figures of one run only are comparable: other engineers' builds and tests shared the
machine's 2 cores during this run (load average before: $load_before, after: $load_after).

- machine: $(host_note)
- date: $started; the run took $took min (including any wait for the VM lock)
- commit: $commit, $(build_note)
- runc $(runc --version 2>/dev/null | awk 'NR == 1 { print $3 }'), crun $(crun --version 2>/dev/null | awk 'NR == 1 { print $3 }'), containerd $(containerd --version 2>/dev/null | awk '{ print $3 }'), docker $(dockerd --version 2>/dev/null | awk '{ print $3 }' | tr -d ,)
- guest (husk-vm): 1 vCPU, 128 MiB, the busybox bundle on virtio-fs; PVM host, where every
  guest kernel instruction is emulated (shared/substrate.md): a cold boot takes ~25 s here (root disk)
- crun: runs in a private mount namespace where cgroup2's controllers file is hidden by an
  empty bind mount (it refuses hybrid cgroup hosts); the \`nsenter\` it needs is timed alone
EOF
    local group keys
    while IFS='|' read -r group keys; do
        printf '\n## %s\n\n| measurement | runtime | median | min - max | n | ratio |\n| --- | --- | --- | --- | --- | --- |\n' "$group"
        awk -F'\t' -v keys="$keys" '
            BEGIN { n = split(keys, k, " "); for (i = 1; i <= n; i++) order[k[i]] = i }
            ($1 in order) { row[++rows] = $0
                if ($4 != "n/a" && ($3 == "runc" || ($3 == "host" && !(($1 SUBSEP $2) in base)))) base[$1, $2] = $6 }
            END {
                for (i = 1; i <= n; i++) for (r = 1; r <= rows; r++) {
                    split(row[r], f, "\t"); if (f[1] != k[i]) continue
                    if (f[4] == "n/a") { printf "| %s | %s | n/a: %s | | | |\n", f[2], f[3], f[5]; continue }
                    ratio = ""
                    # Two significant digits below 0.1 (virtio-fs and network in the guest
                    # are thousands of times slower here: 0.00 would hide that).
                    if ((f[1], f[2]) in base && base[f[1], f[2]] > 0) {
                        q = f[6] / base[f[1], f[2]]
                        if (q >= 0.1) ratio = sprintf("%.2f", q)
                        else { d = 1; while (q * 10 ^ d < 10 && d < 9) d++; ratio = sprintf("%." d "f", q) }
                    }
                    spread = (f[5] > 1) ? f[7] " - " f[8] : ""
                    printf "| %s | %s | %s %s | %s | %s | %s |\n", f[2], f[3], f[6], f[4], spread, f[5], ratio
                }
            }' "$results"
    done <<'EOF'
Container start (same busybox bundle)|start-first start-full
VM boot|boot-cold boot-restore
Memory|mem-boot mem-1 mem-4
Engines end to end (busybox image)|engine-ctr engine-docker
virtio-fs vs host|vfs-write vfs-read
Network (container in netns A <-> peer netns B)|net-in net-out net-connect
EOF
}
if [ -n "$render_only" ]; then
    results=$render_only started="(see the run)" took="?" load_before="?" load_after="?"
    render >"$out"
    cat "$out"
    exit 0
fi

# The full run holds the VM lock throughout (re-exec under flock; -o: children do not keep
# it): one lock wait, quieter figures. --quick takes it only around its one cold boot.
if [ -z "$quick" ] && [ -z "${BENCH_LOCKED:-}" ]; then
    bench_log "waiting for $HUSK_VM_LOCK (other engineers' guests run one at a time) ..."
    BENCH_LOCKED=1 exec flock -o "$HUSK_VM_LOCK" "$0" --out "$out"
fi
[ -z "${BENCH_LOCKED:-}" ] || bench_log "holding $HUSK_VM_LOCK for the whole run"
with_vm_lock() {
    if [ -n "${BENCH_LOCKED:-}" ]; then "$@"; return; fi
    bench_log "waiting for $HUSK_VM_LOCK (other engineers' guests run one at a time) ..."
    flock -o "$HUSK_VM_LOCK" "$@"
}

# Prerequisites: the build (scripts/setup.sh) and the runtimes to compare with.
if [ ! -x "$HUSK_BIN" ] || [ ! -f target/husk/busybox-oci.tar ]; then
    bench_log "husk not built: running scripts/setup.sh"
    bash scripts/setup.sh
fi
missing=()
for pkg_cmd in crun:crun runc:runc containerd:containerd docker.io:dockerd; do
    command -v "${pkg_cmd#*:}" >/dev/null || missing+=("${pkg_cmd%%:*}")
done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    bench_log "installing ${missing[*]} (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || true
fi

results=$(mktemp /tmp/husk-bench-results.XXXXXX)
export BENCH_RESULTS=$results HUSK_BIN

started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(now_us)
skipped() { record_na "$1" "$2" "$3" "skipped (--quick)"; }
if [ -n "$quick" ]; then
    bash bench/start.sh 5 0 husk-container runc crun
    skipped start-first "start to first output (\`echo ready\`)" husk-vm
    skipped start-full "full \`run\` of \`true\`" husk-vm
    skipped start-first "start to first output (\`echo ready\`)" husk-vm-cold
    skipped start-full "full \`run\` of \`true\`" husk-vm-cold
    with_vm_lock bash bench/boot.sh 1 0
    skipped boot-restore "restored start to agent ready (\`husk create\`, daemon's timer)" husk-vm
    skipped mem-1 "memory per running sandbox (1 and 4 sandboxes)" husk-vm
    bash bench/engines.sh 3
    skipped vfs-write "virtio-fs sequential write and read vs host" husk-vm
    skipped net-in "TCP throughput and connect latency vs a peer namespace" husk-vm
else
    bash bench/start.sh 10 3 husk-vm husk-vm-cold husk-container runc crun
    bash bench/boot.sh 3 5
    bash bench/memory.sh 1
    bash bench/memory.sh 4
    bash bench/engines.sh 10
    bash bench/virtiofs.sh 2
    bash bench/net.sh 1
fi
took=$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 60e6 }')
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$(dirname "$out")"
render >"$out"
cat "$out"
bench_log "wrote $out (took $took min); results kept in $results (bench/run.sh --render $results)"
exit 0
}
