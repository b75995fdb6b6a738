#!/usr/bin/env bash
# Container start: time to the container's first output (`echo ready`) and full
# `RUNTIME run` of `true` (create + start + wait + delete), the same busybox bundle for
# every runtime, alternating runtimes in each round (A B C A B C ...).
#
# Usage: bench/start.sh RUNS VM_RUNS RUNTIME...
#   runtimes: runc crun husk-container husk-vm husk-vm-cold
# husk-vm restores each guest from the template of its root (made by its warm-up run, a
# cold boot); husk-vm-cold boots every guest (`--no-template`, ~45 s here). Both run
# VM_RUNS rounds only; the caller holds the VM lock (run.sh does). One warm-up run per
# runtime, not recorded (husk-vm-cold: none). Results go to $BENCH_RESULTS.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=$1 vm_runs=$2
shift 2
runtimes=("$@")
work=$(mktemp -d /tmp/husk-bench-start.XXXXXX)
export BENCH_CMD_LOG=$work/cmd.log

cleanup() {
    local root id
    for root in "$work"/root-*; do
        [ -d "$root" ] || continue
        case "$root" in
            *runc) for id in $(runc --root "$root" list -q 2>/dev/null); do runc --root "$root" delete --force "$id" || true; done ;;
            *crun) for id in $(nsenter -m -t "${CRUN_NS_PID:-1}" crun --root "$root" list -q 2>/dev/null); do nsenter -m -t "$CRUN_NS_PID" crun --root "$root" delete --force "$id" || true; done ;;
            *) for id in $("$HUSK_BIN" --root "$root" list -q 2>/dev/null); do "$HUSK_BIN" --root "$root" delete --force "$id" || true; done ;;
        esac
    done >/dev/null 2>&1
    crun_ns_stop
    remove_work "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_bundle "$work/echo" echo ready
make_bundle "$work/true" true

# cmd RUNTIME BUNDLE ID: the command line that runs BUNDLE in the foreground.
cmd() {
    local rt=$1 bundle=$2 id=$3
    case "$rt" in
        runc) echo runc --root "$work/root-runc" run -b "$bundle" "$id" ;;
        crun) echo nsenter -m -t "$CRUN_NS_PID" crun --root "$work/root-crun" run -b "$bundle" "$id" ;;
        husk-container) echo "$HUSK_BIN" --root "$work/root-husk" --isolation container run -b "$bundle" "$id" ;;
        husk-vm) echo "$HUSK_BIN" --root "$work/root-huskvm" --isolation vm run -b "$bundle" "$id" ;;
        husk-vm-cold) echo "$HUSK_BIN" --root "$work/root-huskvm-cold" --isolation vm run --no-template -b "$bundle" "$id" ;;
    esac
}

declare -A first full skip
active=()
for rt in "${runtimes[@]}"; do
    case "$rt" in
        crun)
            command -v crun >/dev/null || { skip[$rt]="crun not installed (apt-get install crun)"; continue; }
            crun_ns_start "$work" || { skip[$rt]="could not hide the cgroup2 controllers file in a private mount namespace"; continue; }
            ;;
        runc) command -v runc >/dev/null || { skip[$rt]="runc not installed"; continue; } ;;
    esac
    if [ "$rt" != husk-vm-cold ]; then
        # shellcheck disable=SC2046
        if ! time_ms $(cmd "$rt" "$work/true" "warm-$rt") >/dev/null; then
            skip[$rt]="warm-up run failed: $(tail -1 "$BENCH_CMD_LOG")"
            continue
        fi
    fi
    active+=("$rt")
done

n=0
for round in $(seq "$runs"); do
    for rt in "${active[@]}"; do
        [ -z "${skip[$rt]:-}" ] || continue
        case "$rt" in husk-vm*) [ "$round" -le "$vm_runs" ] || continue ;; esac
        n=$((n + 1))
        # shellcheck disable=SC2046
        if out=$(first_output_ms $(cmd "$rt" "$work/echo" "e$n-$rt")); then
            first[$rt]+="${out%% *} "
        else
            skip[$rt]="run failed: $(tail -1 "$BENCH_CMD_LOG")"
            continue
        fi
        # shellcheck disable=SC2046
        if t=$(time_ms $(cmd "$rt" "$work/true" "t$n-$rt")); then
            full[$rt]+="$t "
        else
            skip[$rt]="run failed: $(tail -1 "$BENCH_CMD_LOG")"
        fi
    done
done

for rt in "${runtimes[@]}"; do
    if [ -n "${first[$rt]:-}" ] && [ -z "${skip[$rt]:-}" ]; then
        # shellcheck disable=SC2086
        record start-first "start to first output (\`echo ready\`)" "$rt" ms ${first[$rt]}
        # shellcheck disable=SC2086
        record start-full "full \`run\` of \`true\`" "$rt" ms ${full[$rt]}
    else
        record_na start-first "start to first output (\`echo ready\`)" "$rt" "${skip[$rt]:-not run}"
        record_na start-full "full \`run\` of \`true\`" "$rt" "${skip[$rt]:-not run}"
    fi
done

# The cost of crun's namespace wrapper (nsenter), to read crun's rows with.
if [ -n "${CRUN_NS_PID:-}" ]; then
    w=()
    for _ in $(seq "$runs"); do w+=("$(time_ms nsenter -m -t "$CRUN_NS_PID" true)"); done
    record start-full "full \`run\` of \`true\`" "(nsenter wrapper alone, included in crun)" ms "${w[@]}"
fi
