# shellcheck shell=bash
# Shared helpers of the bench/ scripts (sourced, not run). Benchmarks print figures;
# they assert nothing about time.
#
# Results are lines of a TSV file ($BENCH_RESULTS), one per measured row:
#   KEY  LABEL  RUNTIME  UNIT  N  MEDIAN  MIN  MAX      (a measured row)
#   KEY  LABEL  RUNTIME  n/a   REASON                   (a row whose prerequisite is missing)
# KEY groups rows into one table line-up (ratios are taken against RUNTIME "runc" of the
# same KEY); run.sh renders them as Markdown.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_REPO=$(cd "$BENCH_DIR/.." && pwd)
: "${BENCH_RESULTS:=/dev/null}"
: "${HUSK_BIN:=$BENCH_REPO/target/debug/husk}"
: "${HUSK_VM_LOCK:=/tmp/husk-vm.lock}"

bench_log() { echo "[bench $(date +%T)] $*" >&2; }

# The husk binary of the guest-boot benchmarks (boot_vs_qemu, kernel_args_ab,
# boot_profile): $1 if given (the caller's HUSK_BIN from before sourcing this file, which
# defaults HUSK_BIN to the debug build; the caller checks that it runs), else the release
# build, else the debug build; prints nothing when there is none.
vm_bench_husk_bin() {
    local candidate
    if [ -n "$1" ]; then echo "$1"; return; fi
    for candidate in "$BENCH_REPO/target/release/husk" "$BENCH_REPO/target/debug/husk"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
}

# Wall clock in microseconds (bash 5 builtin: no fork, so it adds nothing to what it times).
now_us() {
    local t=${EPOCHREALTIME/./}
    echo "$t"
}

# Milliseconds (one decimal) between two now_us values.
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1000 }'; }

# stats V...: prints "N MEDIAN MIN MAX" of the numbers given (median of an even count is
# the mean of the two middle values). Prints "0 - - -" for no values.
stats() {
    if [ $# -eq 0 ]; then echo "0 - - -"; return; fi
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%d %s %s %s\n", NR, fmt(m), fmt(v[1]), fmt(v[NR])
        }
        function fmt(x) { return (x == int(x)) ? sprintf("%d", x) : sprintf("%.1f", x) }'
}

median() { local s; s=$(stats "$@"); s=${s#* }; echo "${s%% *}"; }

# median_lines [DECIMALS]: the median of the numbers on stdin, one per line, "-" for
# none: the middle value as written for an odd count, the mean of the two middle values
# with DECIMALS decimals (default 3) for an even count (the boot benchmarks print seconds
# to the millisecond and ms to a tenth).
median_lines() {
    sort -g | awk -v d="${1:-3}" '{ v[NR] = $1 }
        END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]
              else printf "%." d "f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# The guest side of the VM boot benchmarks (boot_vs_qemu, boot_profile), for both VMMs.
# vm_bench_image_kind IMAGE: "disk" for an ext2/3/4 image (superblock magic 0xef53 at byte
# 1080), else "initramfs".
vm_bench_image_kind() {
    if [ "$(od -An -tx1 -j1080 -N2 "$1" | tr -d ' \n')" = 53ef ]; then echo disk; else echo initramfs; fi
}

# vm_bench_cmdline IMAGE_KIND EXTRA: the kernel command line a guest of husk's kernel needs
# from a VMM without husk's platform CPUID leaves (runtime/src/vmm/boot/cmdline.rs: the
# base, the PVM part with `clearcpuid=` on PVM hosts, the root disk's arguments as
# runtime/src/vmm/boot/mod.rs adds them), then EXTRA: QEMU's.
vm_bench_cmdline() {
    local cmdline
    cmdline="$(cat "$BENCH_REPO/guest-kernel-config/cmdline.base")"
    if [ -d /sys/module/kvm_pvm ]; then
        cmdline="$cmdline $(cat "$BENCH_REPO/guest-kernel-config/cmdline.pvm")"
    fi
    [ "$1" = disk ] && cmdline="$cmdline root=/dev/vda ro rootfstype=ext4 init=/init"
    echo "$cmdline $2"
}

# vm_bench_qemu_argv KERNEL IMAGE VCPUS MEM_MIB CMDLINE: sets the array QEMU_ARGV to the
# peer VMM of shared/substrate.md (QEMU microvm from Debian's package, its CPU model for
# this machine) booting KERNEL with IMAGE. A root disk goes in as a read-only virtio-blk
# device, with `acpi=off` so that QEMU puts the virtio-mmio device on the kernel command
# line as husk does (the guest kernel has no ACPI); anything else as the initramfs.
vm_bench_qemu_argv() {
    local kernel=$1 image=$2 vcpus=$3 mem=$4 cmdline=$5
    if [ "$(vm_bench_image_kind "$image")" = disk ]; then
        QEMU_ARGV=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off
            -drive "id=root,file=$image,format=raw,if=none,readonly=on"
            -device virtio-blk-device,drive=root)
    else
        QEMU_ARGV=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -initrd "$image")
    fi
    QEMU_ARGV+=(-enable-kvm -cpu qemu64,+x2apic,+xsaveerptr -m "$mem" -smp "$vcpus"
        -nographic -no-reboot -kernel "$kernel" -append "$cmdline")
}

# record KEY LABEL RUNTIME UNIT VALUES...: appends a measured row, and prints it.
record() {
    local key=$1 label=$2 runtime=$3 unit=$4 n med min max
    shift 4
    read -r n med min max < <(stats "$@")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$label" "$runtime" "$unit" "$n" "$med" "$min" "$max" >>"$BENCH_RESULTS"
    bench_log "$label, $runtime: median $med $unit (min $min, max $max, n=$n; all: $*)"
}

# record_na KEY LABEL RUNTIME REASON: a row whose prerequisite is missing.
record_na() {
    printf '%s\t%s\t%s\tn/a\t%s\n' "$1" "$2" "$3" "$4" >>"$BENCH_RESULTS"
    bench_log "$2, $3: n/a: $4"
}

# time_ms CMD...: runs CMD (stdout and stderr to $BENCH_CMD_LOG), prints its wall time in
# ms; returns CMD's status.
time_ms() {
    local t0 t1 rc=0
    t0=$(now_us)
    "$@" >>"${BENCH_CMD_LOG:-/dev/null}" 2>&1 || rc=$?
    t1=$(now_us)
    ms_between "$t0" "$t1"
    return "$rc"
}

# first_output_ms CMD...: runs CMD, prints "FIRST TOTAL" in ms: the time until the first
# byte on its stdout, and until it exited. Returns CMD's status (1 if it printed nothing).
first_output_ms() {
    local t0 t1 t2 pid rc=0 byte=
    t0=$(now_us)
    exec {fd}< <("$@" 2>>"${BENCH_CMD_LOG:-/dev/null}")
    pid=$!
    IFS= read -r -N1 -u "$fd" byte || true
    t1=$(now_us)
    cat <&"$fd" >/dev/null
    wait "$pid" || rc=$?
    t2=$(now_us)
    exec {fd}<&-
    [ -n "$byte" ] || { echo "- -"; return 1; }
    echo "$(ms_between "$t0" "$t1") $(ms_between "$t0" "$t2")"
    return "$rc"
}

# kib FIELD PID: a /proc/PID/status field in KiB (empty if the process is gone).
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/status" 2>/dev/null || true; }

# A bundle with the busybox rootfs running ARGS... in DIR (husk-rootfs), terminal off.
make_bundle() {
    local dir=$1
    shift
    "$BENCH_REPO/target/debug/husk-rootfs" bundle --out "$dir" --force -- "$@" >/dev/null
}

# host_note: one line describing this machine, for the report.
host_note() {
    echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r), KVM: $([ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware)"
}

# crun refuses cgroup v1/v2 hybrid hosts ("cgroups in hybrid mode not supported, drop all
# controllers from cgroupv2"). Least invasive workaround: a holder process in a private
# mount namespace where an empty file is bind-mounted over
# /sys/fs/cgroup/unified/cgroup.controllers; crun runs in that namespace via `nsenter -m`.
# The host's file is never touched, other runtimes and engineers see nothing; the cost is
# one extra exec (nsenter) per crun command, measured as its own row. crun_ns_start sets
# CRUN_NS_PID; crun_ns_stop ends it.
crun_ns_start() {
    local dir=$1
    : >"$dir/empty-controllers"
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare -m --propagation private sh -c \
        'mount --bind "$1" /sys/fs/cgroup/unified/cgroup.controllers && echo $$ >"$2" && exec sleep infinity' \
        sh "$dir/empty-controllers" "$dir/crun-ns.pid" &
    local _i
    for _i in $(seq 50); do [ -s "$dir/crun-ns.pid" ] && break; sleep 0.1; done
    CRUN_NS_PID=$(cat "$dir/crun-ns.pid" 2>/dev/null || true)
    [ -n "$CRUN_NS_PID" ]
}
crun_ns_stop() {
    if [ -n "${CRUN_NS_PID:-}" ]; then kill "$CRUN_NS_PID" 2>/dev/null || true; fi
    CRUN_NS_PID=
}

# remove_work DIR: removes a bench work directory, unless something is still mounted under
# it (a sandbox's share bind mounts that its delete did not undo): then it is kept and
# named, never removed through a live mount.
remove_work() {
    if awk -v w="$1/" 'index($2, w) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        bench_log "mounts left under $1: not removing it (umount them, then rm -rf it)"
        return 0
    fi
    rm -rf "$1"
}
