#!/usr/bin/env bash
# Snapshot benchmark (figures, no assertions): cold boot to agent ready vs. start from a
# snapshot taken at ready, and the memory of 1..K VMs restored from one snapshot.
#
# Usage: bench/snapshot.sh [K]      (default K=4)
# Environment: HUSK_BIN (default target/debug/husk), HUSK_KERNEL / HUSK_INITRD.
#
# - cold: `husk vmm boot --snapshot-to F` boots to the agent's ready signal and writes F;
#   its "ready after" is the cold boot figure, then the snapshot write time.
# - restored: `husk vmm boot --restore F --until-ready` maps F copy-on-write, restores
#   the state and counts as ready once its vCPUs are back; "ready after" is that time, and
#   the process's wall time (exec to exit) is reported too. (Time to the first agent answer
#   after a restore is a figure of tests/tests/full_snapshot.rs.)
# - memory: K restored VMs alive together; each one's PSS (/proc/PID/smaps_rollup), which
#   splits the snapshot's page-cache pages among the VMs that map them.
# Holds /tmp/husk-vm.lock for the whole run (real guests run throughout).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
k=${1:-4}
bin=${HUSK_BIN:-$repo/target/debug/husk}
[ -x "$bin" ] || { echo "no husk binary at $bin: run cargo build -p husk" >&2; exit 1; }
lock=${HUSK_VM_LOCK:-/tmp/husk-vm.lock}

if [ -z "${SNAPSHOT_BENCH_LOCKED:-}" ]; then
    SNAPSHOT_BENCH_LOCKED=1 exec flock -o "$lock" "$0" "$@"
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

snap=$work/ready.snap
"$bin" vmm boot --snapshot-to "$snap" --timeout 600 >"$work/cold.log" 2>&1 \
    || { tail -20 "$work/cold.log" >&2; exit 1; }
cold_ms=$(sed -n 's/^boot: ready after \([0-9]*\) ms/\1/p' "$work/cold.log")
write_ms=$(sed -n 's/^snapshot: .* written in \([0-9]*\) ms/\1/p' "$work/cold.log")
size_mib=$(( $(stat -c %s "$snap") >> 20 ))
alloc_mib=$(( $(stat -c %b "$snap") * $(stat -c %B "$snap") >> 20 ))
echo "cold boot to agent ready: ${cold_ms} ms; snapshot written in ${write_ms} ms (${size_mib} MiB file, ${alloc_mib} MiB on disk)"
# Which optional vCPU state this host refused to save (PVM lacks some), from the JSON state.
if command -v python3 >/dev/null; then
    python3 - "$snap" <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read(1 << 20)
n = struct.unpack("<Q", b[48:56])[0]
state = json.loads(b[128:128 + n])
for v in state["vcpus"]:
    print(f"vCPU {v['index']}: {len(v['msrs'])} MSRs saved; xsave {'yes' if v['xsave'] else 'no'};"
          f" refused: {'; '.join(v['unavailable']) or 'nothing'}")
PY
fi

t0=$EPOCHREALTIME
"$bin" vmm boot --restore "$snap" --until-ready >"$work/restore.log" 2>&1 \
    || { tail -20 "$work/restore.log" >&2; exit 1; }
t1=$EPOCHREALTIME
restore_ms=$(sed -n 's/^boot: ready after \([0-9]*\) ms/\1/p' "$work/restore.log")
wall_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
echo "restored to running: ${restore_ms} ms in the VMM, ${wall_ms} ms process wall time"
awk -v c="$cold_ms" -v r="$wall_ms" 'BEGIN { if (r > 0) printf "cold / restored (wall): %.0fx\n", c / r }'

pss_kib() { awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup"; }
for n in $(seq 1 "$k"); do
    "$bin" vmm boot --restore "$snap" >"$work/vm$n.log" 2>&1 &
    pids+=("$!")
    sleep 2 # let the restored guest run a little (timers, idle loop)
    total=0
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { tail -5 "$work"/vm*.log >&2; exit 1; }
        total=$(( total + $(pss_kib "$pid") ))
    done
    echo "$n restored VM(s) alive: PSS total $(( total / 1024 )) MiB, $(( total / n / 1024 )) MiB per VM"
done
