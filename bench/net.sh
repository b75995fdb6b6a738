#!/usr/bin/env bash
# TCP throughput and connect latency between a container and a peer network namespace,
# husk --isolation vm next to runc in the same setup: namespaces A and B joined by a veth
# pair (10.201.0.1/24 in A, 10.201.0.2/24 in B); the container runs in A (the spec's
# network namespace path, as CNI gives it) and serves `iperf3 -s`; from B, iperf3 sends
# to it for 5 s (peer -> container) and receives from it for 5 s (-R, container -> peer),
# a Python client in B times 20 TCP connects to a closed port of the container (SYN out,
# RST back from the container's kernel).
# iperf3 (Debian's, dynamically linked) is copied into the busybox rootfs with its
# libraries; /tmp is a tmpfs (iperf3 maps its buffers from a temp file).
#
# Usage: bench/net.sh RUNS   The caller holds the VM lock (run.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=${1:-1}
secs=5
probes=20
work=$(mktemp -d /tmp/husk-bench-net.XXXXXX)
export BENCH_CMD_LOG=${BENCH_CMD_LOG:-$work/cmd.log}
ns_a=hb-net-a-$$
ns_b=hb-net-b-$$
cleanup() {
    local id
    for id in $("$HUSK_BIN" --root "$work/root" list -q 2>/dev/null); do
        "$HUSK_BIN" --root "$work/root" delete --force "$id" >/dev/null 2>&1 || true
    done
    runc --root "$work/runc" delete --force bench-net >/dev/null 2>&1 || true
    ip netns del "$ns_a" 2>/dev/null || true
    ip netns del "$ns_b" 2>/dev/null || true
    remove_work "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

keys=(net-in net-out net-connect)
labels=("TCP throughput peer -> container (iperf3, ${secs} s)"
    "TCP throughput container -> peer (iperf3 -R, ${secs} s)"
    "TCP connect round trip from the peer (SYN -> RST, median of ${probes})")
if ! command -v iperf3 >/dev/null; then
    for i in 0 1 2; do
        record_na "${keys[$i]}" "${labels[$i]}" husk-vm "iperf3 not installed (apt-get install iperf3)"
    done
    exit 0
fi

ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add vA netns "$ns_a" type veth peer name vB netns "$ns_b"
ip -n "$ns_a" addr add 10.201.0.1/24 dev vA
ip -n "$ns_b" addr add 10.201.0.2/24 dev vB
ip -n "$ns_a" link set vA up
ip -n "$ns_b" link set vB up
ip -n "$ns_b" link set lo up

make_bundle "$work/b" iperf3 -s
rootfs=$work/b/rootfs
mkdir -p "$rootfs/tmp" "$rootfs/usr/bin"
cp -L "$(command -v iperf3)" "$rootfs/usr/bin/iperf3"
for lib in $(ldd "$(command -v iperf3)" | grep -o '/[^ ]*'); do
    cp -L --parents "$lib" "$rootfs"
done
python3 - "$work/b/config.json" "/run/netns/$ns_a" <<'PY'
import json, sys
p, netns = sys.argv[1], sys.argv[2]
c = json.load(open(p))
c["process"]["env"] = [e for e in c["process"]["env"] if not e.startswith("PATH=")] + [
    "PATH=/usr/bin:/bin:/sbin"]
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["linux"]["namespaces"].append({"type": "network", "path": netns})
c["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777"]})
json.dump(c, open(p, "w"), indent=2)
PY

# One iperf3 client run from B (ARGS: extra flags); prints the receiver's Mbit/s.
# Retried while the server is not listening: it boots (VM), or it is still between two
# tests (iperf3 re-creates its listener after each one; seconds in a PVM guest).
iperf_run() {
    local tries=0 out
    while :; do
        out=$(ip netns exec "$ns_b" iperf3 -c 10.201.0.1 -J "$@" 2>>"$BENCH_CMD_LOG" |
            python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)
except ValueError:
    raise SystemExit("iperf3: no JSON")
if "error" in r:
    raise SystemExit("iperf3: " + r["error"])
print("%.2f" % (r["end"]["sum_received"]["bits_per_second"] / 1e6))' 2>>"$BENCH_CMD_LOG") && break
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { bench_log "iperf3 in the container never answered"; return 1; }
        sleep 2
    done
    echo "$out"
}

# Median round trip, in µs, of $probes TCP connects from B to a closed port of the
# container's address: SYN out, RST back from the container's kernel. It is the TCP
# handshake's network path without the application (a listener in the guest would add
# its accept and fork times, seconds on PVM, and fill its backlog).
connect_rtt_us() {
    ip netns exec "$ns_b" python3 - "$probes" <<'PY'
import socket, statistics, sys, time
times = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    t = time.perf_counter()
    try:
        s.connect(("10.201.0.1", 5999))
        raise SystemExit("port 5999 of the container is open")
    except ConnectionRefusedError:
        times.append((time.perf_counter() - t) * 1e6)
    s.close()
    time.sleep(0.1)
print("%.0f" % statistics.median(times))
PY
}

declare -A in_v out_v conn_v
measure() { # RUNTIME
    iperf_run -t 1 >/dev/null # warm-up, and waits for the server
    in_v[$1]+=" $(iperf_run -t "$secs")"
    out_v[$1]+=" $(iperf_run -t "$secs" -R)"
    conn_v[$1]+=" $(connect_rtt_us)"
}

# BENCH_NET_RUNTIMES: which of "husk-vm runc" to measure (default both).
runtimes=${BENCH_NET_RUNTIMES:-husk-vm runc}
for ((r = 1; r <= runs; r++)); do
    for rt in $runtimes; do
        bench_log "net: run $r/$runs: $rt"
        case $rt in
        husk-vm)
            "$HUSK_BIN" --root "$work/root" --isolation vm create -b "$work/b" bench-net \
                </dev/null >>"$BENCH_CMD_LOG" 2>&1
            "$HUSK_BIN" --root "$work/root" start bench-net >>"$BENCH_CMD_LOG" 2>&1
            measure husk-vm
            "$HUSK_BIN" --root "$work/root" delete --force bench-net >>"$BENCH_CMD_LOG" 2>&1
            ;;
        runc)
            runc --root "$work/runc" run --detach --bundle "$work/b" bench-net \
                </dev/null >>"$BENCH_CMD_LOG" 2>&1
            measure runc
            runc --root "$work/runc" delete --force bench-net >>"$BENCH_CMD_LOG" 2>&1
            ;;
        esac
    done
done

for rt in $runtimes; do
    # shellcheck disable=SC2086 # one value per word
    record net-in "${labels[0]}" "$rt" Mbit/s ${in_v[$rt]}
    # shellcheck disable=SC2086
    record net-out "${labels[1]}" "$rt" Mbit/s ${out_v[$rt]}
    # shellcheck disable=SC2086
    record net-connect "${labels[2]}" "$rt" µs ${conn_v[$rt]}
done
