#!/usr/bin/env bash
# Boots the guest kernel under QEMU microvm with a tiny busybox initramfs and
# checks that user space runs (which on PVM hosts proves patches 0001-0003).
# It is a check of the kernel alone, independent of the husk VMM.
#
# Usage: boot-test.sh [VMLINUX] [-- EXTRA KERNEL ARGS...]
#   VMLINUX defaults to the output of ./build.sh.
# Environment:
#   HUSK_BOOT_SMP      vCPUs (default 1)
#   HUSK_BOOT_TIMEOUT  seconds before giving up (default 600)
#   HUSK_BOOT_LOG      where the serial log goes (default: a temp file)
# Exit status 0 when the init marker was seen.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HUSK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}
smp=${HUSK_BOOT_SMP:-1}
timeout_s=${HUSK_BOOT_TIMEOUT:-600}
marker=HUSK-BOOT-TEST-OK

die() {
    printf '[boot-test] error: %s\n' "$*" >&2
    exit 1
}

vmlinux=
if [ $# -gt 0 ] && [ "$1" != -- ]; then
    vmlinux=$1
    shift
fi
[ "${1:-}" = -- ] && shift
[ -n "$vmlinux" ] || vmlinux=$("$here/build.sh" | tail -n1)
[ -f "$vmlinux" ] || die "$vmlinux: no such kernel; build one with $here/build.sh"
command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found; install it: apt-get install qemu-system-x86"
[ -x /bin/busybox ] || die "/bin/busybox not found; install it: apt-get install busybox-static"

# gen_init_cpio from the kernel source writes /dev/console as a device node
# without needing root or mknod.
gen=$cache/tools/gen_init_cpio
if [ ! -x "$gen" ]; then
    src=$(ls -d "$cache"/src/linux-source-6.1-*/usr/gen_init_cpio.c 2>/dev/null | head -n1)
    [ -n "$src" ] || die "kernel source not unpacked yet; run $here/build.sh first"
    mkdir -p "$cache/tools"
    cc -O2 -o "$gen.tmp" "$src" && mv "$gen.tmp" "$gen"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Every process spawned costs seconds on PVM: the script uses shell builtins
# where it can and forks exactly three programs (mount, uname, reboot).
cat >"$work/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "uname: \$(/bin/busybox uname -a)"
cpus=0
while read -r line; do
    case "\$line" in processor*) cpus=\$((cpus + 1)) ;; esac
done </proc/cpuinfo
echo "cpus online: \$cpus"
echo $marker
/bin/busybox reboot -f
EOF
cat >"$work/list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /bin 0755 0 0
dir /proc 0755 0 0
file /bin/busybox /bin/busybox 0755 0 0
file /init $work/init 0755 0 0
EOF
"$gen" "$work/list" >"$work/init.cpio"

cmdline="$(cat "$here/cmdline.base") printk.time=1"
[ -d /sys/module/kvm_pvm ] && cmdline="$cmdline $(cat "$here/cmdline.pvm")"
[ $# -gt 0 ] && cmdline="$cmdline $*"
log=${HUSK_BOOT_LOG:-$cache/boot-test/serial.log}
mkdir -p "$(dirname "$log")"

# Prefix each serial line with the wall-clock seconds since QEMU started, so
# the log shows host time as well as the guest's printk time.
stamp() {
    local t0=$EPOCHREALTIME line
    while IFS= read -r line; do
        printf '[+%7.2f] %s\n' "$(bc <<<"$EPOCHREALTIME - $t0")" "${line%$'\r'}"
    done
}

echo "[boot-test] $vmlinux smp=$smp cmdline: $cmdline" >&2
: >"$log" # never read a previous run's log
start=$EPOCHREALTIME
qemu-system-x86_64 \
    -M microvm,x-option-roms=off,rtc=off -enable-kvm -cpu qemu64,+x2apic,+xsaveerptr \
    -m 128 -smp "$smp" -nographic -no-reboot \
    -kernel "$vmlinux" -initrd "$work/init.cpio" -append "$cmdline" \
    </dev/null > >(stamp >>"$log") 2>&1 &
qemu=$!

# QEMU pauses (does not exit) when KVM cannot emulate an instruction, so
# watch the log: stop on the marker's reboot, an emulation failure or the
# timeout.
status=0
while kill -0 "$qemu" 2>/dev/null; do
    if grep -q 'KVM internal error' "$log"; then
        sleep 1 # let QEMU finish printing the register dump
        status=emulation-failure
        kill "$qemu"
        break
    fi
    # QEMU microvm has no i8042, so reboot=k cannot reset it: the kernel
    # spins in kb_wait() polling port 0x64 (30 s to minutes). The test is
    # over once the marker is out and the kernel started its restart.
    if grep -q 'reboot: machine restart' "$log"; then
        sleep 2
        status=no-reset
        kill "$qemu" 2>/dev/null || true
        break
    fi
    if [ "$(bc <<<"$EPOCHREALTIME - $start > $timeout_s")" = 1 ]; then
        status=timeout
        kill "$qemu"
        break
    fi
    sleep 0.5
done
wait "$qemu" 2>/dev/null || true
sleep 0.2 # let the log writer drain
end=$EPOCHREALTIME

grep -E 'Run /init|reboot: machine restart|uname:|cpus online|smp: Brought up|Kernel panic|'"$marker" "$log" >&2 || true
printf '[boot-test] wall time %.1f s, serial log %s\n' "$(bc <<<"$end - $start")" "$log" >&2
case $status in
emulation-failure)
    # Name the function the vCPU stopped in, from the System.map next to vmlinux.
    rip=$(sed -n 's/.*RIP=\([0-9a-f]*\).*/\1/p' "$log" | head -n1)
    map=$(dirname "$vmlinux")/System.map
    fn=unknown
    [ -f "$map" ] && [ -n "$rip" ] &&
        fn=$(awk -v rip="$rip" '$1 <= rip { f = $3 } END { print f }' <(sort "$map"))
    die "KVM could not emulate an instruction at rip $rip ($fn); see $log" ;;
timeout) die "timed out after $timeout_s s" ;;
no-reset) echo "[boot-test] guest restarted; QEMU stopped by the test (microvm has no i8042 reset)" >&2 ;;
esac
grep -q "\] $marker" "$log" || die "marker $marker not seen"
echo "[boot-test] OK" >&2
