#!/usr/bin/env bash
# Where an emulated guest boot spends its time (not a timed test): records one husk boot
# with `perf record -e kvm:kvm_emulate_insn` (on PVM hosts every guest kernel instruction is
# emulated and traced) until a line of the guest's console, then prints
# bench/boot_profile.py's tables: functions by time, the costliest single instructions,
# the boot phases (start_kernel's steps, each initcall) and the share of timer ticks.
# This is how the session 6 and 7 cuts were found (bench/README.md).
#
# Usage: bench/boot_profile.sh [OUT_DIR]     (default: a new temporary directory)
# Environment:
#   UNTIL        console line to stop at (default "Run /init as init process"; e.g.
#                "husk-agent: ready" for the whole boot)
#   HUSK_BIN     default target/release/husk, else target/debug/husk
#   HUSK_KERNEL  default target/husk/vmlinux; its System.map must sit next to the file the
#                link points at (the kernel cache keeps both)
#   HUSK_INITRD  default target/husk/guest-root.img
#   CONSOLE_ARGS default "loglevel=6", as bench/boot_vs_qemu.sh (CONSOLE_ARGS= for the whole log)
#   EXTRA        kernel arguments to add; TOP rows per table (default 30)
#   VMM          husk (default) or qemu: the peer of bench/boot_vs_qemu.sh booting the same
#                kernel, image and command line, so that the two traces can be compared
#                function by function (bench/boot_calls.py TRACE MAP --diff QEMU_TRACE)
# The trace slows the guest about twofold: compare times within one profile only.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "boot_profile: $*" >&2; exit 1; }

out=${1:-$(mktemp -d)}
mkdir -p "$out"
until_line=${UNTIL:-Run /init as init process}
kernel=${HUSK_KERNEL:-$repo/target/husk/vmlinux}
initrd=${HUSK_INITRD:-$repo/target/husk/guest-root.img}
user_bin=${HUSK_BIN:-}
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
bin=$(vm_bench_husk_bin "$user_bin")
[ -n "$bin" ] && [ -x "$bin" ] || die "no runnable husk binary${bin:+ at $bin}: run cargo build --release -p husk, or set HUSK_BIN"
[ -f "$kernel" ] || die "no guest kernel at $kernel: run scripts/setup.sh"
[ -f "$initrd" ] || die "no guest image at $initrd: run scripts/setup.sh"
system_map="$(dirname "$(readlink -f "$kernel")")/System.map"
[ -f "$system_map" ] || die "no System.map next to $(readlink -f "$kernel")"
command -v perf >/dev/null || die "perf missing: apt-get install linux-perf"
command -v python3 >/dev/null || die "python3 missing: apt-get install python3"
[ -d /sys/kernel/tracing/events/kvm ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null ||
    die "no kvm tracepoints: mount tracefs on /sys/kernel/tracing (as root)"

log=$out/console.log
: >"$log"
vmm=${VMM:-husk}
echo "boot_profile: recording one $vmm boot until \"$until_line\" into $out ..." >&2
extra="${CONSOLE_ARGS-loglevel=6} ${EXTRA:-}"
case $vmm in
husk) vmm_argv=("$bin" vmm boot --kernel "$kernel" --initrd "$initrd" --vcpus 1 --mem-mib 128
        --timeout 300 --cmdline-extra "$extra") ;;
qemu) command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
    vm_bench_qemu_argv "$kernel" "$initrd" 1 128 "$(vm_bench_cmdline "$(vm_bench_image_kind "$initrd")" "$extra")"
    vmm_argv=("${QEMU_ARGV[@]}") ;;
*) die "VMM=$vmm: use husk or qemu" ;;
esac
flock "$HUSK_VM_LOCK" perf record -q -e kvm:kvm_emulate_insn -o "$out/perf.data" -- \
    "${vmm_argv[@]}" </dev/null >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
    grep -qF "$until_line" "$log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
grep -qF "$until_line" "$log" || echo "boot_profile: \"$until_line\" never came; profiling what ran" >&2
pkill -INT -P "$pid" perf 2>/dev/null || true
pkill -INT -P "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
# "TIME RIP" per emulated instruction; the rip is the second field of the tracepoint's
# "vcpu:rip:..." text.
perf script -i "$out/perf.data" -F time,trace 2>/dev/null |
    awk '{ t = $1; sub(":", "", t)
           for (i = 2; i <= NF; i++) if ($i ~ /^[0-9a-f]+:[0-9a-f]+:/) { split($i, a, ":"); print t, a[2]; break } }' \
        >"$out/trace.txt"
[ -s "$out/trace.txt" ] || die "no emulated instructions recorded (not a PVM host?): see $log"
python3 "$repo/bench/boot_profile.py" --top "${TOP:-30}" "$out/trace.txt" "$system_map"
