#!/usr/bin/env python3
"""Profile of one emulated guest boot, from a timed trace of the emulated instructions.

Input: lines "TIME RIP" (seconds, hex guest rip), one per instruction the host's KVM
emulated (bench/boot_profile.sh makes them with `perf script -F time,trace`), and the
guest kernel's System.map. On PVM hosts the guest kernel is emulated instruction by
instruction, so the time to the next line is what each instruction cost.

Prints: the functions that took the most time (with their instruction counts), the
single instructions that cost most (`rep movs`/`stos` are emulated element by element),
the boot phases (start_kernel's steps, each initcall) and the share of timer ticks.
Phases and ticks are told apart by function entries only, so work another thread does
during an initcall counts towards that initcall.
"""
import argparse
import bisect
import collections
import sys

# A phase starts when one of these calls a function (start_kernel's steps, initcalls).
PHASE_PARENTS = {
    "start_kernel", "setup_arch", "do_one_initcall", "kernel_init", "kernel_init_freeable",
    "prepare_namespace", "mount_root",
}
TICK_ENTRY = "asm_sysvec_apic_timer_interrupt"
IRQ_RETURN = "restore_regs_and_return_to_kernel"


class Symbols:
    """Text symbols of a System.map, for rip -> (function, is its first byte)."""

    def __init__(self, path):
        syms = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    syms.append((int(parts[0], 16), parts[2]))
        if not syms:
            raise SystemExit(f"boot_profile: no text symbols in {path}: pass the kernel's System.map")
        syms.sort()
        self.addrs = [a for a, _ in syms]
        self.names = [n for _, n in syms]
        self.cache = {}

    def lookup(self, rip):
        hit = self.cache.get(rip)
        if hit is None:
            x = int(rip, 16)
            i = bisect.bisect_right(self.addrs, x) - 1
            if i < 0 or x < 0xFFFFFFFF80000000:
                hit = ("(user or firmware)", False)
            else:
                hit = (self.names[i], x == self.addrs[i])
            self.cache[rip] = hit
        return hit


def profile(lines, syms):
    """Aggregates a trace; returns a dict of counters and totals."""
    fn_time, fn_count = collections.Counter(), collections.Counter()
    rip_time, rip_count = collections.Counter(), collections.Counter()
    phase_time, phase_count = collections.Counter(), collections.Counter()
    phase, prev_fn, prev = "(before start_kernel's steps)", None, None
    in_tick, ticks, tick_time, tick_count = False, 0, 0.0, 0
    first = None
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            continue
        t, rip = float(parts[0]), parts[1]
        fn, at_entry = syms.lookup(rip)
        if first is None:
            first = t
        if prev is not None:
            # The previous instruction cost the time up to this one.
            p_t, p_rip, p_fn, p_phase, p_tick = prev
            d = t - p_t
            fn_time[p_fn] += d
            fn_count[p_fn] += 1
            rip_time[(p_rip, p_fn)] += d
            rip_count[(p_rip, p_fn)] += 1
            phase_time[p_phase] += d
            phase_count[p_phase] += 1
            if p_tick:
                tick_time += d
                tick_count += 1
        if at_entry and prev_fn in PHASE_PARENTS and fn != prev_fn and fn != "__fentry__":
            phase = f"{prev_fn} > {fn}"
        if at_entry and fn == TICK_ENTRY:
            in_tick, ticks = True, ticks + 1
        prev = (t, rip, fn, phase, in_tick)
        if in_tick and fn == IRQ_RETURN:
            in_tick = False
        prev_fn = fn
    span = (prev[0] - first) if prev else 0.0
    return {
        "span": span, "insns": sum(fn_count.values()),
        "fn_time": fn_time, "fn_count": fn_count,
        "rip_time": rip_time, "rip_count": rip_count,
        "phase_time": phase_time, "phase_count": phase_count,
        "ticks": ticks, "tick_time": tick_time, "tick_count": tick_count,
    }


def report(p, top, out=sys.stdout):
    span, n = p["span"], p["insns"]
    if n == 0:
        print("no emulated instructions in the trace", file=out)
        return
    pct = lambda v: 100 * v / span if span else 0.0
    print(f"{n} emulated instructions over {span:.3f} s ({span / n * 1e6:.3f} us each)", file=out)
    print(f"timer ticks: {p['ticks']}, {p['tick_count']} instructions "
          f"({100 * p['tick_count'] / n:.1f}%), {p['tick_time']:.3f} s ({pct(p['tick_time']):.1f}%)",
          file=out)
    print("\nfunctions by time:", file=out)
    for fn, v in p["fn_time"].most_common(top):
        c = p["fn_count"][fn]
        print(f"  {v:8.3f} s {pct(v):5.1f}% {c:9d} insns {v / c * 1e6:8.2f} us/insn  {fn}", file=out)
    print("\ncostliest single instructions (rep string operations and the like):", file=out)
    costly = [(v, k) for k, v in p["rip_time"].items() if v / p["rip_count"][k] > 20e-6]
    for v, (rip, fn) in sorted(costly, reverse=True)[:top]:
        c = p["rip_count"][(rip, fn)]
        print(f"  {v:8.3f} s {c:7d} x {v / c * 1e6:8.1f} us  {rip} {fn}", file=out)
    print("\nphases by time:", file=out)
    for ph, v in p["phase_time"].most_common(top):
        print(f"  {v:8.3f} s {pct(v):5.1f}% {p['phase_count'][ph]:9d} insns  {ph}", file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help='lines "TIME RIP", one per emulated instruction')
    ap.add_argument("system_map", help="the guest kernel's System.map")
    ap.add_argument("--top", type=int, default=30, help="rows per table (default 30)")
    args = ap.parse_args()
    syms = Symbols(args.system_map)
    with open(args.trace) as f:
        report(profile(f, syms), args.top)


if __name__ == "__main__":
    main()
