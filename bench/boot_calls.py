#!/usr/bin/env python3
"""Per-call costs of an emulated guest boot, from bench/boot_profile.sh's trace.

Input: the trace (lines "TIME RIP", one per emulated guest instruction) and the guest
kernel's System.map. A shadow call stack is rebuilt from the call and return instructions
(read from the vmlinux next to the System.map) and interrupt entries. Each function's
inclusive cost is the instructions from its entry to its return, without the interrupt
handlers that ran meanwhile (timer ticks), counted once per outermost frame (recursion is
not counted twice).

Modes:
  boot_calls.py TRACE MAP                    functions by inclusive instructions, with
                                             calls and instructions per call
  boot_calls.py TRACE MAP --under FN         the same, only inside FN's frames (what FN
                                             spends its instructions on)
  boot_calls.py TRACE MAP --children FN      FN's direct callees by inclusive instructions
  boot_calls.py TRACE MAP --callers FN       FN's callers (three frames up), by calls
  boot_calls.py TRACE MAP --diff TRACE2      exclusive instructions per function of TRACE2
                                             minus TRACE (e.g. a QEMU boot against a husk
                                             boot of the same kernel), largest first

Context switches make frames that sleep approximate (marked *): use the figures to find
candidates, then measure a cut with INSNS=1 bench/boot_vs_qemu.sh.
"""
import argparse
import collections
import os
import struct
import sys

# The System.map reader (the same lookup as the profile tables).
from boot_profile import Symbols


def rips(path):
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                yield parts[1]


def exclusive(path, syms):
    """Instructions per function (where the rip was)."""
    count = collections.Counter()
    for rip in rips(path):
        count[syms.lookup(rip)[0]] += 1
    return count


class Text:
    """The guest kernel's code from its ELF vmlinux (the loaded segments), to tell calls
    and returns apart. Code patched at run time (alternatives) may differ; calls and
    returns mostly do not."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 2:
            raise SystemExit(f"boot_calls: {path} is not an ELF64 vmlinux")
        phoff, = struct.unpack_from("<Q", d, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", d, 0x36)
        self.segments = []
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", d, phoff + i * phentsize)
            if p_type == 1:  # PT_LOAD
                self.segments.append((p_vaddr, p_vaddr + p_filesz, p_offset))
        self.cache = {}

    def kind(self, rip):
        """("call", its length), ("ret", 0), ("iret", 0) or ("", 0) for the instruction
        at rip (hex text)."""
        k = self.cache.get(rip)
        if k is None:
            k = ("", 0)
            x = int(rip, 16)
            for start, end, off in self.segments:
                if start <= x < end:
                    b = self.data[off + x - start: off + x - start + 8]
                    i = 1 if b and 0x40 <= b[0] <= 0x4f else 0  # REX prefix
                    op = b[i] if len(b) > i + 2 else 0
                    if op == 0xe8:
                        k = ("call", i + 5)
                    elif op == 0xff and (b[i + 1] >> 3) & 7 == 2:
                        k = ("call", i + 2 + modrm_extra(b[i + 1], b[i + 2]))
                    elif op in (0xc3, 0xc2):
                        k = ("ret", 0)
                    elif op == 0xcf:
                        k = ("iret", 0)
                    break
            self.cache[rip] = k
        return k


def modrm_extra(modrm, sib):
    """Bytes after a ModRM byte (SIB and displacement) in 64-bit mode."""
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 0
    extra = 1 if rm == 4 else 0
    if mod == 1:
        extra += 1
    elif mod == 2 or (mod == 0 and rm == 5) or (mod == 0 and rm == 4 and sib & 7 == 5):
        extra += 4
    return extra


def inclusive(path, syms, text, under=None, callers_of=None, children_of=None):
    """Per function: (inclusive instructions, calls, instructions of calls that slept),
    optionally only inside `under`; with `callers_of`, the calls counter counts that
    function's callers instead. Frames are pushed by call instructions and interrupt
    entries, popped by returns, so the count is exact except where a frame slept: a
    context switch runs other tasks while the frame is on the (single) shadow stack;
    those frames are reported as sleeping."""
    incl, calls, slept_incl = collections.Counter(), collections.Counter(), collections.Counter()
    # [function, instruction index at entry, nested interrupt instructions by then,
    #  interrupt depth, slept, return address, the function that called]
    stack = []
    active = collections.Counter()  # frames of each function on the stack
    n = 0
    # irq_n[d]: instructions run at interrupt depth > d (a handler's instructions are not
    # counted to the frames it interrupted)
    irq_n = [0] * 64
    irq_depth = 0

    def pop_frame():
        nonlocal irq_depth
        fn, start, irq_start, depth, slept, _, caller = stack.pop()
        active[fn] -= 1
        if fn.startswith("asm_"):
            irq_depth -= 1
        cost = (n - start) - (irq_n[depth] - irq_start)
        if children_of is not None:
            if caller == children_of:
                (slept_incl if slept else incl)[fn] += cost
        elif active[fn] == 0 and (under is None or active[under] > 0 or fn == under):
            (slept_incl if slept else incl)[fn] += cost
        return slept

    prev_x, prev_fn, prev_kind, prev_len = 0, None, "", 0
    for rip in rips(path):
        fn, at_entry = syms.lookup(rip)
        x = int(rip, 16)
        if prev_kind in ("ret", "iret"):
            # Pop to the frame this returns to: for a ret the call after which it lands (a
            # ret that matches no frame, as a task's first run or code patched at run
            # time, pops nothing), for an iret the innermost interrupt.
            for depth in range(len(stack) - 1, -1, -1):
                if (stack[depth][5] == x if prev_kind == "ret"
                        else stack[depth][0].startswith("asm_")):
                    slept = False
                    while len(stack) > depth:
                        slept = pop_frame() or slept
                    if slept and stack:
                        stack[-1][4] = True
                    break
        elif (prev_kind == "call" and x != prev_x + prev_len) or (at_entry and fn.startswith("asm_")):
            # A call (not one patched into a no-op at run time) or an interrupt entry,
            # which returns to where it interrupted.
            ret_to = prev_x + prev_len if prev_kind == "call" else None
            if callers_of is not None and fn == callers_of:
                calls[" < ".join(f[0] for f in stack[-1:-4:-1])] += 1
            elif children_of is not None:
                if prev_fn == children_of:
                    calls[fn] += 1
            elif callers_of is None and (under is None or active[under] > 0):
                calls[fn] += 1
            if fn.startswith("asm_") and irq_depth < len(irq_n) - 1:
                irq_depth += 1
            stack.append([fn, n, irq_n[irq_depth], irq_depth, False, ret_to, prev_fn])
            active[fn] += 1
            if fn == "__switch_to_asm":
                for frame in stack:
                    frame[4] = True
        prev_x, prev_fn = x, fn
        prev_kind, prev_len = text.kind(rip)
        n += 1
        for d in range(irq_depth):
            irq_n[d] += 1
    while stack:
        pop_frame()
    return incl, calls, slept_incl, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("system_map")
    ap.add_argument("--vmlinux", help="the guest kernel ELF (default: next to the System.map)")
    ap.add_argument("--under", help="only count inside this function's frames")
    ap.add_argument("--diff", metavar="TRACE2", help="exclusive instructions, TRACE2 - TRACE")
    ap.add_argument("--children", metavar="FN", help="only FN's direct callees")
    ap.add_argument("--callers", metavar="FN", help="who calls FN (three frames), how often")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    syms = Symbols(args.system_map)
    out = sys.stdout
    if args.diff:
        a, b = exclusive(args.trace, syms), exclusive(args.diff, syms)
        print(f"instructions: {sum(a.values())} vs {sum(b.values())} "
              f"({sum(b.values()) - sum(a.values()):+d})", file=out)
        delta = collections.Counter({f: b[f] - a[f] for f in set(a) | set(b)})
        rows = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:args.top]
        for fn, d in rows:
            print(f"  {d:+9d} {a[fn]:9d} {b[fn]:9d}  {fn}", file=out)
        return
    vmlinux = args.vmlinux or os.path.join(os.path.dirname(args.system_map), "vmlinux")
    text = Text(vmlinux)
    if args.callers:
        _, calls, _, _ = inclusive(args.trace, syms, text, callers_of=args.callers)
        for chain, c in calls.most_common(args.top):
            print(f"  {c:7d}  {args.callers} < {chain}", file=out)
        return
    incl, calls, slept, n = inclusive(args.trace, syms, text, args.under,
                                      children_of=args.children)
    scope = f" inside {args.under}" if args.under else ""
    scope = f" called by {args.children}" if args.children else scope
    print(f"{n} instructions; functions by inclusive instructions{scope} "
          "(* = some calls slept: other tasks' work counted too):", file=out)
    both = incl + slept
    for fn, v in both.most_common(args.top):
        c = calls[fn]
        per = f"{v / c:9.0f}" if c else "        -"
        mark = "*" if slept[fn] else " "
        print(f"  {v:9d} {100 * v / n:5.1f}% {c:7d} calls {per}/call {mark} {fn}", file=out)


if __name__ == "__main__":
    main()
