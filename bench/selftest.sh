#!/usr/bin/env bash
# Cheap check of the benchmark scripts (no guest, no runtime, well under a second): the
# entry point's --help works and lib.sh's helpers compute medians and spreads correctly.
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
"$dir/run.sh" --help | grep -q -- '--quick' || { echo "bench selftest: run.sh --help does not describe --quick" >&2; fail=1; }
if "$dir/run.sh" --no-such-flag >/dev/null 2>&1; then echo "bench selftest: run.sh accepted an unknown flag" >&2; fail=1; fi
results=$(mktemp) md=$(mktemp)
trap 'rm -f "$results" "$md"' EXIT
BENCH_RESULTS=$results record start-full "a label" runc ms 3 1 2 2>/dev/null
check "$(printf 'start-full\ta label\trunc\tms\t3\t2\t1\t3')" "$(cat "$results")" "record writes a TSV row"
printf 'start-full\ta label\thusk-vm\tms\t1\t4\t4\t4\n' >>"$results"
"$dir/run.sh" --render "$results" --out "$md" >/dev/null
grep -qF '| a label | husk-vm | 4 ms |  | 1 | 2.00 |' "$md" || { echo "bench selftest: --render: no husk-vm row with ratio 2.00 against runc" >&2; fail=1; }
[ "$fail" = 0 ] && echo "bench selftest: ok"
exit "$fail"
