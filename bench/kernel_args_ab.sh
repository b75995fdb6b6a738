#!/usr/bin/env bash
# A/B of guest kernel arguments: husk boots the guest image to agent ready with and without
# ARGS, alternating (A, B, A, B, ...), and prints every boot's time (husk's boot timer:
# the agent's ready port write), then the two medians. How `quiet` for sandboxes' guests
# was measured (runtime/src/daemon/vm_guest.rs, SANDBOX_KERNEL_ARGS).
# A benchmark, not a test: it prints figures, it asserts nothing.
#
# Usage: bench/kernel_args_ab.sh [RUNS] [ARGS]     (defaults: 3, "quiet")
# Environment: HUSK_BIN (default target/release/husk, else target/debug/husk),
#   HUSK_KERNEL / HUSK_INITRD (default: what husk finds in target/husk/, the root disk first).
# Every boot holds $HUSK_VM_LOCK (default /tmp/husk-vm.lock): one real guest at a time here.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-3}
args=${2:-quiet}
user_bin=${HUSK_BIN:-}
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
bin=$(vm_bench_husk_bin "$user_bin")
[ -n "$bin" ] && [ -x "$bin" ] || { echo "kernel_args_ab: no runnable husk binary${bin:+ at $bin}: run cargo build --release -p husk, or set HUSK_BIN" >&2; exit 1; }

# One boot under the lock; prints the ms to agent ready, or "-".
boot_ms() {
    flock "$HUSK_VM_LOCK" "$bin" vmm boot --until-ready --cmdline-extra "$1" </dev/null 2>&1 |
        sed -n 's/.*boot: ready after \([0-9]*\) ms.*/\1/p' | tail -1 | grep . || echo -
}

echo "kernel_args_ab: $runs boots each, alternating; B adds: $args; husk $bin"
a=() b=()
for run in $(seq 1 "$runs"); do
    ms=$(boot_ms ""); a+=("$ms"); echo "A (without)  run $run: ready after $ms ms"
    ms=$(boot_ms "$args"); b+=("$ms"); echo "B (with)     run $run: ready after $ms ms"
done
echo "median A (without): $(printf '%s\n' "${a[@]}" | grep -v '^-$' | median_lines 1) ms"
echo "median B (with $args): $(printf '%s\n' "${b[@]}" | grep -v '^-$' | median_lines 1) ms"
