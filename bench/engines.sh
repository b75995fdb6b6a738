#!/usr/bin/env bash
# End to end through the engines, husk vs runc, alternating: `ctr run --rm IMAGE true`
# (a private containerd; husk through containerd-shim-husk-v2, runc through
# containerd-shim-runc-v2) and `docker run --rm --network none IMAGE true` (a private
# dockerd; husk as a runc-compatible runtime, `--add-runtime husk=$HUSK_BIN`).
# husk runs with HUSK_ISOLATION (default container) in both.
#
# Then `ctr run --rm` of `true` in a microVM (the shim with the annotation
# io.husk.isolation=vm): the first run boots cold and saves the guest template (row
# husk-vm-cold, ~1 min on PVM hosts), VM_RUNS more (default 1) start from it (row husk-vm).
# Each run takes the VM lock $HUSK_VM_LOCK (so the lock wait is not timed; not taken again
# when bench/run.sh holds it: BENCH_LOCKED).
# And a probe of `docker run --runtime io.containerd.husk.v2` (Docker driving the shim
# directly): measured if this dockerd accepts shim v2 runtime names (Moby >= 23),
# otherwise an n/a row with dockerd's answer.
#
# Usage: bench/engines.sh RUNS [VM_RUNS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=$1
vm_runs=${2:-1}
isolation=${HUSK_ISOLATION:-container}
image=docker.io/library/husk-busybox:latest
tar=$BENCH_REPO/target/husk/busybox-oci.tar
# The shim of the same build as HUSK_BIN (it runs the husk next to it).
shim=$(cd "$(dirname "$HUSK_BIN")" && pwd)/containerd-shim-husk-v2
work=$(mktemp -d /tmp/husk-bench-eng.XXXXXX)
export BENCH_CMD_LOG=$work/cmd.log
ctrd="" dockerd_pid=""
cleanup() {
    if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
    if [ -n "$ctrd" ]; then kill "$ctrd" 2>/dev/null || true; wait "$ctrd" 2>/dev/null || true; fi
    # Shims left behind by a killed containerd, then mounts under the work directory.
    pkill_tree_under "$work"
    awk -v w="$work" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$work"
}
# Processes whose command line names the work directory (shims started for it), by pid.
pkill_tree_under() {
    local p c
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" != "$$" ] || continue
        c=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
        if [[ $c == *"$1"* ]]; then kill "${p#/proc/}" 2>/dev/null || true; fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { local _i; for _i in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

ctr_label="\`ctr run --rm\` of \`true\` (end to end)"
docker_label="\`docker run --rm\` of \`true\` (end to end)"

# containerd, with the husk shim first on its PATH.
ctr_ok=
if command -v containerd >/dev/null && [ -x "$shim" ] && [ -f "$tar" ]; then
    mkdir -p "$work/bin"
    ln -s "$shim" "$work/bin/containerd-shim-husk-v2"
    cat >"$work/containerd.toml" <<EOF
version = 2
root = "$work/ctrd-root"
state = "$work/ctrd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/c.sock"
[ttrpc]
  address = "$work/c.sock.ttrpc"
EOF
    PATH="$work/bin:$PATH" HUSK_SHIM_ROOT="$work/husk-shim" HUSK_ISOLATION=$isolation \
        containerd -c "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
    ctrd=$!
    ctr() { command ctr --address "$work/c.sock" "$@"; }
    if wait_for ctr version && ctr image import "$tar" >>"$BENCH_CMD_LOG" 2>&1; then ctr_ok=1; fi
fi

# dockerd (it starts its own containerd), husk added as a runtime. setup.sh's dockerd
# (Moby 26 from Debian trixie) when there is one: Debian 12's 20.10 cannot run the shim.
dockerd_bin=${DOCKERD:-$BENCH_REPO/target/husk/dockerd}
[ -x "$dockerd_bin" ] || dockerd_bin=$(command -v dockerd || true)
docker_ok=
if [ -n "$dockerd_bin" ] && [ -f "$tar" ]; then
    # The shim first on PATH too: dockerd's containerd looks up shim v2 runtimes there.
    PATH="$work/bin:$PATH" HUSK_SHIM_ROOT="$work/husk-shim-docker" HUSK_ISOLATION=$isolation \
        "$dockerd_bin" --data-root "$work/docker" --exec-root "$work/dexec" \
        --pidfile "$work/docker.pid" -H "unix://$work/docker.sock" --iptables=false --bridge=none \
        --add-runtime "husk=$HUSK_BIN" >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    dk() { docker -H "unix://$work/docker.sock" "$@"; }
    if wait_for dk version && dk load -i "$tar" >>"$BENCH_CMD_LOG" 2>&1; then docker_ok=1; fi
fi

declare -A res skip
measure() { # KEY-RUNTIME CMD...
    local k=$1 t
    shift
    [ -z "${skip[$k]:-}" ] || return 0
    if t=$(time_ms "$@"); then res[$k]+="$t "; else skip[$k]="failed: $(tail -1 "$BENCH_CMD_LOG")"; fi
}
n=0
for round in $(seq 0 "$runs"); do  # round 0: warm-up, not recorded
    for rt in husk runc; do
        n=$((n + 1))
        if [ -n "$ctr_ok" ]; then
            measure "ctr-$rt" ctr run --rm --runtime "io.containerd.$rt.v2" "$image" "b$n" true
        fi
        if [ -n "$docker_ok" ]; then
            measure "docker-$rt" dk run --rm --network none --runtime "$rt" "$image" true
        fi
    done
    if [ "$round" = 0 ]; then for k in "${!res[@]}"; do res[$k]=; done; fi
done

# husk-vm through the shim: one guest at a time on this machine.
if [ -n "$ctr_ok" ]; then
    lock_fd=
    if [ -z "${BENCH_LOCKED:-}" ]; then exec {lock_fd}>>"$HUSK_VM_LOCK"; fi
    for i in $(seq 0 "$vm_runs"); do
        key=ctr-husk-vm; [ "$i" = 0 ] && key=ctr-husk-vm-cold
        if [ -n "$lock_fd" ]; then
            bench_log "waiting for $HUSK_VM_LOCK (one guest at a time) ..."
            flock -w 900 "$lock_fd" || { skip[$key]="$HUSK_VM_LOCK busy for 15 min"; break; }
        fi
        measure "$key" ctr run --rm --runtime io.containerd.husk.v2 \
            --annotation io.husk.isolation=vm "$image" "vm$i" true
        if [ -n "$lock_fd" ]; then flock -u "$lock_fd"; fi
        # A failed run ends the series: a failed cold run makes no template to start from.
        if [ -n "${skip[$key]:-}" ]; then break; fi
    done
    if [ -n "$lock_fd" ]; then exec {lock_fd}>&-; fi
fi

# Docker driving the shim itself (no --add-runtime): a probe, then RUNS timed runs.
docker_shim_na=
if [ -n "$docker_ok" ]; then
    if dk run --rm --network none --runtime io.containerd.husk.v2 "$image" true >"$work/docker-shim.out" 2>&1; then
        for _ in $(seq "$runs"); do
            measure docker-shim dk run --rm --network none --runtime io.containerd.husk.v2 "$image" true
        done
    else
        docker_shim_na="dockerd $(dk version -f '{{.Server.Version}}' 2>/dev/null) refused --runtime io.containerd.husk.v2: $(tr '\n' ' ' <"$work/docker-shim.out")"
    fi
fi

for rt in husk runc; do
    label=$rt; [ "$rt" = husk ] && label="husk-$isolation"
    if [ -z "$ctr_ok" ]; then record_na engine-ctr "$ctr_label" "$label" "private containerd did not start or import failed (containerd installed? scripts/setup.sh)"
    elif [ -n "${skip[ctr-$rt]:-}" ]; then record_na engine-ctr "$ctr_label" "$label" "${skip[ctr-$rt]}"
    else
        # shellcheck disable=SC2086
        record engine-ctr "$ctr_label" "$label" ms ${res[ctr-$rt]}
    fi
    if [ -z "$docker_ok" ]; then record_na engine-docker "$docker_label" "$label" "private dockerd did not start or docker load failed: $(tail -1 "$work/dockerd.log" 2>/dev/null)"
    elif [ -n "${skip[docker-$rt]:-}" ]; then record_na engine-docker "$docker_label" "$label" "${skip[docker-$rt]}"
    else
        # shellcheck disable=SC2086
        record engine-docker "$docker_label" "$label" ms ${res[docker-$rt]}
    fi
done
for vm_label in husk-vm-cold husk-vm; do
    k=ctr-$vm_label
    if [ -z "$ctr_ok" ]; then record_na engine-ctr "$ctr_label" "$vm_label" "private containerd did not start or import failed"
    elif [ -n "${skip[$k]:-}" ]; then record_na engine-ctr "$ctr_label" "$vm_label" "${skip[$k]}"
    elif [ -z "${res[$k]:-}" ]; then record_na engine-ctr "$ctr_label" "$vm_label" "not run (the cold run did not finish)"
    else
        # shellcheck disable=SC2086
        record engine-ctr "$ctr_label" "$vm_label" ms ${res[$k]}
    fi
done
shim_label="husk-shim-$isolation (--runtime io.containerd.husk.v2)"
if [ -z "$docker_ok" ]; then record_na engine-docker "$docker_label" "$shim_label" "private dockerd did not start"
elif [ -n "$docker_shim_na" ]; then record_na engine-docker "$docker_label" "$shim_label" "$docker_shim_na"
elif [ -n "${skip[docker-shim]:-}" ]; then record_na engine-docker "$docker_label" "$shim_label" "${skip[docker-shim]}"
else
    # shellcheck disable=SC2086
    record engine-docker "$docker_label" "$shim_label" ms ${res[docker-shim]}
fi
