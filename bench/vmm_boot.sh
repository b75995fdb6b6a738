#!/usr/bin/env bash
# Boot benchmark for the husk VMM (not a timed test): time from VMM start to the agent's
# ready signal, for 1 vCPU / 128 MiB and 2 vCPUs / 256 MiB, and the VMM's own memory.
#
# Usage: bench/vmm_boot.sh [RUNS]      (default 1 run per shape)
# Environment: HUSK_BIN (default target/release/husk, else target/debug/husk),
#              HUSK_KERNEL / HUSK_INITRD (default: what `husk` finds, e.g. target/husk/).
#
# Memory: guest RAM is a shared memfd mapping, so the pages the guest touched show up as
# RssShmem in /proc/PID/status. The VMM's own memory is VmRSS - RssShmem (its heap, stacks,
# binary), sampled every 0.2 s; the peak is reported.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-1}
bin=${HUSK_BIN:-}
if [ -z "$bin" ]; then
    for candidate in "$repo/target/release/husk" "$repo/target/debug/husk"; do
        if [ -x "$candidate" ]; then bin=$candidate; break; fi
    done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no husk binary: run cargo build -p husk" >&2; exit 1; }

kb() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/status" 2>/dev/null || true; }

# One boot: prints "ready_ms own_rss_kib guest_touched_kib".
boot_once() {
    local vcpus=$1 mem=$2 log
    log=$(mktemp)
    "$bin" vmm boot --until-ready --vcpus "$vcpus" --mem-mib "$mem" --timeout 600 >"$log" 2>&1 &
    local pid=$! own_peak=0 guest_peak=0
    while kill -0 "$pid" 2>/dev/null; do
        local rss shmem
        rss=$(kb VmRSS "$pid"); shmem=$(kb RssShmem "$pid")
        if [ -n "$rss" ] && [ -n "$shmem" ]; then
            (( rss - shmem > own_peak )) && own_peak=$(( rss - shmem ))
            (( shmem > guest_peak )) && guest_peak=$shmem
        fi
        sleep 0.2
    done
    wait "$pid" || { echo "boot failed:" >&2; tail -5 "$log" >&2; rm -f "$log"; return 1; }
    local ms
    ms=$(sed -n 's/^boot: ready after \([0-9]*\) ms$/\1/p' "$log" | tail -1)
    rm -f "$log"
    echo "${ms:-none} $own_peak $guest_peak"
}

echo "husk VMM boot benchmark: $bin, host mode $("$bin" features 2>/dev/null | sed -n 's/.*"io.husk.host.kvm": "\(.*\)".*/\1/p')"
printf '%-16s %-4s %14s %16s %20s\n' shape run ready_ms vmm_own_rss_kib guest_touched_kib
for shape in "1 128" "2 256"; do
    set -- $shape
    for run in $(seq 1 "$runs"); do
        read -r ms own guest < <(boot_once "$1" "$2")
        printf '%-16s %-4s %14s %16s %20s\n' "${1}vcpu/${2}MiB" "$run" "$ms" "$own" "$guest"
    done
done
