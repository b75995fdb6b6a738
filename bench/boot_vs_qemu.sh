#!/usr/bin/env bash
# husk vs QEMU microvm, booting the same guest kernel and initramfs with the same kernel
# command line, alternating (husk, QEMU, husk, QEMU, ...) in one run; prints every boot,
# then the medians and the ratio husk/QEMU for time to `Run /init` and to agent ready.
# A benchmark, not a test: it prints figures, it asserts nothing.
#
# Usage: bench/boot_vs_qemu.sh [RUNS]          (default 3 boots per VMM)
# Environment:
#   HUSK_BIN                 default target/release/husk, else target/debug/husk
#   HUSK_KERNEL, HUSK_INITRD default target/husk/vmlinux, and the guest image husk uses:
#                            target/husk/guest-root.img (root disk) if built, else
#                            target/husk/initramfs.cpio. IMAGE=initramfs picks the latter.
#
# A root disk image goes to both VMMs as a read-only virtio-blk device (QEMU:
# `-drive ...,readonly=on -device virtio-blk-device`, and `acpi=off` so that QEMU puts the
# virtio-mmio device on the kernel command line, as husk does: the guest kernel has no
# ACPI) with `root=/dev/vda ro rootfstype=ext4 init=/init` on the command line.
#   VCPUS (1), MEM_MIB (128), CPU_TEMPLATE (husk's --cpu-template, default: husk's default)
#   CONSOLE_ARGS             console verbosity for both VMMs, default "loglevel=6": info lines
#                            off, as in a sandbox (whose guests boot `quiet`), while the
#                            notice-level lines stay, among them "Run /init as init process"
#                            (guest kernel patch 0014). CONSOLE_ARGS= prints the whole log
#                            (what `husk vmm boot` shows by default).
#   EXTRA                    more kernel arguments for both VMMs
#   TIMEOUT_S (300)          per boot
#   INSNS=1                  also count the guest instructions the host's KVM emulated up to
#                            `Run /init` (`perf stat -e kvm:kvm_emulate_insn`, needs perf
#                            and the kvm tracepoints): on PVM hosts the guest kernel runs
#                            emulated, ~1 us per instruction, so this count is the boot's
#                            cost without the host's timing noise. Each VMM is then
#                            stopped at `Run /init` (no ready figure in this mode).
#
# How time is measured, the same way for both VMMs: the clock starts just before the VMM
# process is spawned; each console line is stamped by the same perl filter as it arrives
# on the VMM's stdout. `Run /init` is the kernel's "Run /init as init process" line;
# ready is the agent's "husk-agent: ready" console line. The console line is used for
# both rather than husk's port-0x440 boot timer (QEMU microvm has no device there; an
# isa-debugcon on 0x440 would be observed through a different path than husk's). husk's
# own in-VMM figure (its boot timer saw the agent's port write) is printed too, as a
# cross-check. The command-line differences: husk's `vmm boot` adds the agent's
# power-off-after-ready flag (an argument for /init, not for the kernel), and on PVM hosts
# husk leaves `clearcpuid=` off for a kernel that reads its platform CPUID leaves (guest
# kernel patch 0021, runtime/src/vmm/boot/platform.rs), which list the same features;
# QEMU cannot set those leaves, so its guest gets the names on the command line. The
# same leaves tell husk's guest it has no legacy PIC to set up (QEMU microvm's has one).
#
# Every boot holds $HUSK_VM_LOCK (default /tmp/husk-vm.lock): one real guest at a time here.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-3}
vcpus=${VCPUS:-1}
mem=${MEM_MIB:-128}
timeout_s=${TIMEOUT_S:-300}
extra="${CONSOLE_ARGS-loglevel=6} ${EXTRA:-}"
insns=${INSNS:-0}
kernel=${HUSK_KERNEL:-$repo/target/husk/vmlinux}
if [ -n "${HUSK_INITRD:-}" ]; then
    initrd=$HUSK_INITRD
elif [ "${IMAGE:-disk}" = disk ] && [ -f "$repo/target/husk/guest-root.img" ]; then
    initrd=$repo/target/husk/guest-root.img
else
    initrd=$repo/target/husk/initramfs.cpio
fi
user_bin=${HUSK_BIN:-}
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
bin=$(vm_bench_husk_bin "$user_bin")
die() { echo "boot_vs_qemu: $*" >&2; exit 1; }
[ -n "$bin" ] && [ -x "$bin" ] || die "no runnable husk binary${bin:+ at $bin}: run cargo build --release -p husk, or set HUSK_BIN"
[ -f "$kernel" ] || die "no guest kernel at $kernel: run scripts/setup.sh"
[ -f "$initrd" ] || die "no guest image at $initrd: run scripts/setup.sh"
image_kind=$(vm_bench_image_kind "$initrd")

# Setup: QEMU from Debian's package (the peer VMM of shared/substrate.md).
if ! command -v qemu-system-x86_64 >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
    echo "installing qemu-system-x86 (Debian package) ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi

# The command line husk gives a guest, for QEMU too (bench/lib.sh).
cmdline=$(vm_bench_cmdline "$image_kind" "$extra")
vm_bench_qemu_argv "$kernel" "$initrd" "$vcpus" "$mem" "$cmdline"
template_arg=()
[ -n "${CPU_TEMPLATE:-}" ] && template_arg=(--cpu-template "$CPU_TEMPLATE")

if [ "$insns" = 1 ]; then
    command -v perf >/dev/null || die "INSNS=1 needs perf: apt-get install linux-perf"
    [ -d /sys/kernel/tracing/events/kvm ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Stamps each line with the seconds since $T0.
stamp() { perl -MTime::HiRes=time -ne 'BEGIN { $| = 1 } printf "%.3f %s", time - $ENV{T0}, $_'; }

# Seconds at which the first line matching $2 appeared in log $1, or "-".
seen_at() { awk -v pat="$2" 'index($0, pat) { print $1; found = 1; exit } END { if (!found) print "-" }' "$1"; }

# One boot under the lock. $1 = husk|qemu, $2 = log file.
boot_once() {
    local vmm=$1 log=$2
    : >"$log"
    export T0
    local count=()
    [ "$insns" = 1 ] && count=(perf stat -x, -e kvm:kvm_emulate_insn -o "$log.insns" --)
    T0=$EPOCHREALTIME
    if [ "$vmm" = husk ]; then
        # Without --until-ready the agent prints its ready line, then powers off.
        "${count[@]}" "$bin" vmm boot --kernel "$kernel" --initrd "$initrd" --vcpus "$vcpus" \
            --mem-mib "$mem" "${template_arg[@]}" --timeout "$timeout_s" \
            --cmdline-extra "$extra" </dev/null > >(stamp >>"$log") 2>&1 &
    else
        "${count[@]}" "${QEMU_ARGV[@]}" \
            </dev/null > >(stamp >>"$log") 2>&1 &
    fi
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if grep -q 'husk-agent: ready' "$log"; then break; fi
        if [ "$insns" = 1 ] && grep -q 'Run /init as init process' "$log"; then
            # perf prints its count when the VMM (its child) ends. Only the VMM: the
            # console stamper is a child of perf too, and perf dies writing to it once
            # it is gone.
            pkill -KILL -P "$pid" "^(husk|qemu-system-x86)$" 2>/dev/null || true
            break
        fi
        if grep -q 'KVM internal error\|Kernel panic' "$log"; then break; fi
        if [ "$(awk -v a="$EPOCHREALTIME" -v b="$T0" 'BEGIN { print (a - b > '"$timeout_s"') }')" = 1 ]; then
            break
        fi
        sleep 0.1
    done
    # QEMU is stopped here; husk ends by itself (the agent powers off after ready) and
    # then prints its boot timer's figure.
    if [ "$vmm" = qemu ] && [ "$insns" != 1 ]; then kill "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    sleep 0.2 # let the stamper drain
}

echo "boot_vs_qemu: $runs boots each, alternating; ${vcpus} vCPU, ${mem} MiB"
echo "  kernel $kernel"
echo "  image  $initrd ($image_kind, $(stat -c %s "$initrd") bytes)"
echo "  husk   $bin ${template_arg[*]:-(default CPU template)}"
echo "  qemu   $(qemu-system-x86_64 --version | head -1), -cpu qemu64,+x2apic,+xsaveerptr"
echo "  other builds or tests may share the 2 cores during these runs"
printf '%-5s %-4s %10s %10s %14s\n' vmm run run_init_s ready_s husk_port_ms
for run in $(seq 1 "$runs"); do
    for vmm in husk qemu; do
        log=$work/$vmm.$run.log
        flock "$HUSK_VM_LOCK" bash -c "$(declare -f stamp boot_once); $(declare -p bin kernel initrd vcpus mem template_arg timeout_s extra QEMU_ARGV insns); boot_once $vmm $log"
        init=$(seen_at "$log" 'Run /init as init process')
        ready=$(seen_at "$log" 'husk-agent: ready')
        port=$(sed -n 's/.*boot: ready after \([0-9]*\) ms.*/\1/p' "$log" | tail -1)
        printf '%-5s %-4s %10s %10s %14s\n' "$vmm" "$run" "$init" "$ready" "${port:--}"
        echo "$init" >>"$work/$vmm.init"
        echo "$ready" >>"$work/$vmm.ready"
        if [ "$insns" = 1 ]; then
            n=$(awk -F, '/kvm_emulate_insn/ { print $1 }' "$log.insns" 2>/dev/null || true)
            echo "      $vmm emulated guest instructions to Run /init: ${n:--}"
            echo "${n:--}" >>"$work/$vmm.insns"
        fi
        if [ "$run" = 1 ]; then
            echo "      $vmm command line: $(grep -m1 -o '[Cc]ommand line: .*' "$log" || echo '?')"
        fi
        if [ "$ready" = - ] && [ "$insns" != 1 ]; then
            echo "      $vmm gave no ready line; last console lines:"
            tail -5 "$log" | sed 's/^/        /'
        fi
    done
done

echo
printf '%-22s %10s %10s %12s\n' median husk_s qemu_s husk/qemu
whats="init ready"
[ "$insns" = 1 ] && whats="init insns"
for what in $whats; do
    h=$({ grep -v '^-$' "$work/husk.$what" || true; } | median_lines 3)
    q=$({ grep -v '^-$' "$work/qemu.$what" || true; } | median_lines 3)
    ratio=$(awk -v h="$h" -v q="$q" 'BEGIN { if (h == "-" || q == "-" || q == 0) print "-"; else printf "%.2f", h / q }')
    case $what in
    init) label="Run /init" ;;
    ready) label="agent ready" ;;
    insns) label="insns to Run /init" ;;
    esac
    printf '%-22s %10s %10s %12s\n' "$label" "$h" "$q" "$ratio"
done
