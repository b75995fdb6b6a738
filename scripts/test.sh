#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs husk's tests, tier by tier (docs/design.md):
#   lint    rustfmt and clippy
#   tier 1  unit tests next to the code, and each crate's own tests/ (no guest)
#   tier 2  host integration tests: tests/tests/*.rs except full_*.rs (tiny guest programs
#           on /dev/kvm, the agent on the host, ...)
#   tier 3  full path: tests/tests/full_*.rs boot the real guest kernel (minutes each on
#           PVM hosts); one at a time so VMs do not compete for the 2 cores.
# Every tier runs; the script fails if any failed, and prints the time each took.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
cd "$HUSK_REPO"

"$HUSK_REPO/scripts/setup.sh" || die "setup failed"

failed=()

run_tier() {
    local name=$1
    shift
    stage "$name"
    if ! timed "$name" "$@"; then
        failed+=("$name")
    fi
}

# Test targets of the husk-tests crate, split by the full_ prefix.
targets() {
    local want_full=$1 f base
    for f in tests/tests/*.rs; do
        [ -e "$f" ] || continue
        base=$(basename "$f" .rs)
        case "$base" in
            full_*) [ "$want_full" = 1 ] && echo "$base" ;;
            *) [ "$want_full" = 0 ] && echo "$base" ;;
        esac
    done
}

cargo_tests() {
    local extra=$1 t args=()
    shift
    for t in "$@"; do args+=(--test "$t"); done
    [ ${#args[@]} -gt 0 ] || { echo "error: no test targets for this tier" >&2; return 1; }
    # Every test file runs even after one failed, so one run reports all failures.
    # shellcheck disable=SC2086
    cargo test --no-fail-fast -p husk-tests "${args[@]}" -- $extra
}

[ -e /dev/kvm ] || echo "error: /dev/kvm is missing: tiers 2 and 3 will fail (they need KVM)" >&2

run_tier "lint: rustfmt" cargo fmt --all --check
run_tier "lint: clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
run_tier "lint: bench selftest" bash bench/selftest.sh
run_tier "tier 1: unit tests" cargo test --workspace --exclude husk-tests
mapfile -t host_targets < <(targets 0)
run_tier "tier 2: host integration" cargo_tests "" "${host_targets[@]}"
mapfile -t full_targets < <(targets 1)
run_tier "tier 3: full path" cargo_tests "--test-threads=1" "${full_targets[@]}"

stage "total"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED tiers: ${failed[*]}" >&2
    exit 1
fi
echo "all tiers passed" >&2
