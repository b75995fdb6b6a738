#!/usr/bin/env bash
# Cheap check of the benchmark scripts (no guest, no runtime, well under a second): the
# entry point's --help works, lib.sh's helpers compute medians and spreads correctly, and
# boot_profile.py attributes a made-up trace's time to the right function, instruction,
# phase and tick.
# Called from scripts/test.sh's lint tier; the benchmark itself is never run in CI.
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$dir/lib.sh"

fail=0
check() { # WANT GOT WHAT
    if [ "$1" != "$2" ]; then echo "bench selftest: $3: want '$1', got '$2'" >&2; fail=1; fi
}
check "3 2 1 3" "$(stats 3 1 2)" "stats of an odd count"
check "4 25 10 40" "$(stats 40 10 30 20)" "stats of an even count (mean of the middle two)"
check "4 2.5 1 4" "$(stats 1 2 3 4)" "fractional median"
check "3 9.5 2.5 100" "$(stats 100 9.5 2.5)" "numeric, not lexical, order"
check "0 - - -" "$(stats)" "no values"
check 7 "$(median 7)" "median of one value"
check 20.5 "$(median 30 11 20.5 20.5)" "median helper"
check 1.5 "$(ms_between 1000000 1001500)" "ms_between"
check 2 "$(printf '3\n1\n2\n' | median_lines)" "median_lines of an odd count: the middle value as written"
check 6.072 "$(printf '6.043\n6.1\n' | median_lines)" "median_lines of an even count, 3 decimals"
check 2.5 "$(printf '4\n1\n2\n3\n' | median_lines 1)" "median_lines with 1 decimal"
check - "$(: | median_lines)" "median_lines of nothing"
for script in "$dir"/*.sh; do bash -n "$script" || { echo "bench selftest: $script does not parse" >&2; fail=1; }; done
own_bin=$(mktemp)
chmod +x "$own_bin"
check "$own_bin" "$(vm_bench_husk_bin "$own_bin")" "vm_bench_husk_bin: the caller's HUSK_BIN first"
check "" "$(BENCH_REPO=/nonexistent vm_bench_husk_bin "")" "vm_bench_husk_bin: no build, no binary"
check /nonexistent/husk "$(vm_bench_husk_bin /nonexistent/husk)" "vm_bench_husk_bin: a given HUSK_BIN is kept (the script names it when it does not run)"
rm -f "$own_bin"
"$dir/run.sh" --help | grep -q -- '--quick' || { echo "bench selftest: run.sh --help does not describe --quick" >&2; fail=1; }
if "$dir/run.sh" --no-such-flag >/dev/null 2>&1; then echo "bench selftest: run.sh accepted an unknown flag" >&2; fail=1; fi
results=$(mktemp) md=$(mktemp)
trap 'rm -f "$results" "$md"' EXIT
BENCH_RESULTS=$results record start-full "a label" runc ms 3 1 2 2>/dev/null
check "$(printf 'start-full\ta label\trunc\tms\t3\t2\t1\t3')" "$(cat "$results")" "record writes a TSV row"
printf 'start-full\ta label\thusk-vm\tms\t1\t4\t4\t4\n' >>"$results"
"$dir/run.sh" --render "$results" --out "$md" >/dev/null
grep -qF '| a label | husk-vm | 4 ms |  | 1 | 2.00 |' "$md" || { echo "bench selftest: --render: no husk-vm row with ratio 2.00 against runc" >&2; fail=1; }
# boot_profile.py on a made-up trace: a 3-instruction function, a 1 ms rep instruction, an
# initcall phase (its 3 instructions and the tick inside it) and one timer tick.
map=$(mktemp) trace=$(mktemp) prof=$(mktemp)
trap 'rm -f "$results" "$md" "$map" "$trace" "$prof"' EXIT
printf '%s\n' "ffffffff81000000 T do_one_initcall" "ffffffff81000100 t foo_init" \
    "ffffffff81000200 T asm_sysvec_apic_timer_interrupt" \
    "ffffffff81000300 T restore_regs_and_return_to_kernel" "ffffffff81000400 T zzz_end" >"$map"
printf '%s\n' "1.000000 ffffffff81000000" "1.000001 ffffffff81000100" "1.000002 ffffffff81000104" \
    "1.001002 ffffffff81000108" "1.001003 ffffffff81000200" "1.001004 ffffffff81000300" \
    "1.001005 ffffffff81000108" >"$trace"
python3 "$dir/boot_profile.py" "$trace" "$map" >"$prof"
grep -qF "6 emulated instructions over 0.001 s" "$prof" || { echo "bench selftest: boot_profile.py: wrong totals" >&2; fail=1; }
grep -qE "^ +0\.001 s +1 x +1000\.0 us +ffffffff81000104 foo_init$" "$prof" || { echo "bench selftest: boot_profile.py: the 1 ms instruction is not the costliest" >&2; fail=1; }
grep -qE "^ +0\.001 s .* 5 insns +do_one_initcall > foo_init$" "$prof" || { echo "bench selftest: boot_profile.py: no foo_init phase" >&2; fail=1; }
grep -qF "timer ticks: 1, 2 instructions" "$prof" || { echo "bench selftest: boot_profile.py: tick not counted" >&2; fail=1; }
# boot_calls.py on a made-up vmlinux and trace: main calls foo (two instructions: nop,
# ret) and a timer interrupt (entry, iretq) comes back to main; foo's inclusive cost is 2
# instructions in 1 call, and the interrupt's 2 instructions are not main's.
elf=$(mktemp) calls=$(mktemp)
trap 'rm -f "$results" "$md" "$map" "$trace" "$prof" "$elf" "$calls"' EXIT
python3 - "$elf" <<'PY'
import struct, sys
base = 0xffffffff81000000
code = bytearray(0x300)
code[0:5] = b"\xe8" + struct.pack("<i", 0x100 - 5)  # main: call foo
code[5:7] = b"\x90\x90"                              # nop; nop
code[0x100:0x102] = b"\x90\xc3"                     # foo: nop; ret
code[0x200:0x203] = b"\x90\x48\xcf"                 # asm_sysvec_apic_timer_interrupt: nop; iretq
hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
hdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, base, 64, 0, 0, 64, 56, 1, 0, 0, 0)
ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, base, base, len(code), len(code), 0x1000)
open(sys.argv[1], "wb").write((hdr + ph).ljust(0x1000, b"\0") + code)
PY
printf '%s\n' "ffffffff81000000 T main" "ffffffff81000100 t foo" \
    "ffffffff81000200 T asm_sysvec_apic_timer_interrupt" "ffffffff81000300 T zzz_end" >"$map"
printf '%s\n' "1.0 ffffffff81000000" "1.1 ffffffff81000100" "1.2 ffffffff81000101" \
    "1.3 ffffffff81000005" "1.4 ffffffff81000200" "1.5 ffffffff81000201" "1.6 ffffffff81000006" >"$trace"
python3 "$dir/boot_calls.py" --vmlinux "$elf" --children main "$trace" "$map" >"$calls"
grep -qE "^ +2 .* 1 calls +2/call +foo$" "$calls" || { echo "bench selftest: boot_calls.py: foo is not 2 instructions in 1 call" >&2; cat "$calls" >&2; fail=1; }
python3 "$dir/boot_calls.py" --vmlinux "$elf" "$trace" "$map" >"$calls"
grep -qE "^ +2 .* 1 calls +2/call +asm_sysvec_apic_timer_interrupt$" "$calls" || { echo "bench selftest: boot_calls.py: the interrupt is not 2 instructions" >&2; cat "$calls" >&2; fail=1; }
[ "$fail" = 0 ] && echo "bench selftest: ok"
exit "$fail"
