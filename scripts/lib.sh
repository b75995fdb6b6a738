# Shared helpers for husk's scripts: stage timing and paths. Sourced, not run.

HUSK_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HUSK_OUT="$HUSK_REPO/target/husk"
export HUSK_CACHE="${HUSK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}"
HUSK_T0=${HUSK_T0:-$(date +%s)}
export HUSK_T0

# stage NAME: announce a stage with the time since the script started.
stage() {
    printf '==> [%4ss] %s\n' "$(( $(date +%s) - HUSK_T0 ))" "$*" >&2
}

die() {
    echo "error: $*" >&2
    exit 1
}

# timed NAME CMD...: run CMD, then print how long it took; keeps CMD's exit status.
timed() {
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@"
    rc=$?
    printf '==> %s took %ss (exit %s)\n' "$name" "$(( $(date +%s) - start ))" "$rc" >&2
    return $rc
}

# need_disk_space DIR GB: fail early, naming DIR, when its filesystem has less than GB
# gigabytes free (a linker that runs out of space mid-build dies of SIGBUS, which says
# nothing about the cause).
need_disk_space() {
    local dir=$1 want_gb=$2 avail_kb
    mkdir -p "$dir"
    avail_kb=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
    if [ -n "$avail_kb" ] && [ "$avail_kb" -lt $(( want_gb * 1024 * 1024 )) ]; then
        die "$dir has $(( avail_kb / 1024 / 1024 )) GB free, the build and tests need about ${want_gb} GB: free space there (e.g. cargo clean in other checkouts) and run again"
    fi
}
