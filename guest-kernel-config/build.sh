#!/usr/bin/env bash
# Builds the husk guest kernel (an ELF vmlinux) from Debian's linux-source-6.1
# package: `make tinyconfig` + fragments/*.config + patches/*.patch.
#
# Prints the path of the cached vmlinux as the LAST line of stdout; progress
# goes to stderr. The result is cached under
#   $HUSK_CACHE/kernel/<key>/{vmlinux,System.map,.config,inputs}
# where <key> hashes the fragments, the patches, this script and the
# linux-source package version; a second run with nothing changed returns at
# once. See README.md for the cache layout.
#
# Environment:
#   HUSK_CACHE        cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/husk)
#   HUSK_KERNEL_JOBS  make -j (default 3)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HUSK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}
jobs=${HUSK_KERNEL_JOBS:-3}
source_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
build_deps=(linux-source-6.1 build-essential flex bison libelf-dev bc cpio xz-utils)

started=$(date +%s)
stage_started=$started
log() { printf '[guest-kernel %4ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
stage() {
    local now
    now=$(date +%s)
    log "stage $1 (previous stage took $((now - stage_started)) s)"
    stage_started=$now
}
die() {
    printf '[guest-kernel] error: %s\n' "$*" >&2
    exit 1
}

# --- build dependencies ----------------------------------------------------
missing_packages() {
    local pkg
    for pkg in "${build_deps[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            printf '%s ' "$pkg"
    done
}

install_deps() {
    local missing
    missing=$(missing_packages)
    [ -z "$missing" ] && return 0
    stage "install-deps: $missing"
    [ "$(id -u)" = 0 ] ||
        die "missing packages: $missing; install them (apt-get install $missing) or run as root"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq $missing >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq $missing >&2; } ||
        die "apt-get install $missing failed"
}

# --- cache key ---------------------------------------------------------------
# Sorted file lists so the key does not depend on the shell's glob order.
fragments=()
while IFS= read -r f; do fragments+=("$f"); done < <(cd "$here" && ls fragments/*.config | LC_ALL=C sort)
patches=()
while IFS= read -r f; do patches+=("$f"); done < <(cd "$here" && ls patches/*.patch 2>/dev/null | LC_ALL=C sort)
[ "${#fragments[@]}" -gt 0 ] || die "no fragments in $here/fragments/*.config"

hash_files() { # label, files (relative to $here) -> sha256 of names + contents
    local f
    {
        printf '%s\n' "$1"
        shift
        for f in "$@"; do
            printf '== %s\n' "$f"
            cat "$here/$f"
        done
    } | sha256sum | cut -c1-16
}

# The package must be there before its version can be part of the key.
dpkg-query -W -f='${Status}' "$source_pkg" 2>/dev/null | grep -q 'install ok installed' || install_deps
pkg_version=$(dpkg-query -W -f='${Version}' "$source_pkg")
key=$(hash_files "$source_pkg $pkg_version" build.sh "${fragments[@]}" "${patches[@]}")
# Source trees depend on the package and the patches only, so a changed
# fragment reuses the patched tree and the object directory (incremental build).
tree_key=$(hash_files "$source_pkg $pkg_version" "${patches[@]}")
out=$cache/kernel/$key

if [ -f "$out/vmlinux" ]; then
    log "cached: key $key"
    echo "$out/vmlinux"
    exit 0
fi

# --- one build at a time -----------------------------------------------------
mkdir -p "$cache/kernel" "$cache/src" "$cache/build"
exec 9>"$cache/kernel/.lock"
if ! flock -n 9; then
    log "waiting for another guest-kernel build (lock $cache/kernel/.lock)"
    flock 9
fi
if [ -f "$out/vmlinux" ]; then # built by whoever held the lock
    log "cached: key $key"
    echo "$out/vmlinux"
    exit 0
fi
# Leftovers of interrupted runs; safe to remove while holding the lock.
rm -rf "$cache"/kernel/.tmp-* "$cache"/src/.tmp-*

install_deps
[ -f "$tarball" ] || die "$tarball not found although $source_pkg is installed; reinstall it"

# --- pristine source, unpacked once per package version ----------------------
pristine=$cache/src/$source_pkg-$pkg_version
if [ ! -d "$pristine" ]; then
    stage "unpack $tarball"
    tmp=$cache/src/.tmp-unpack-$$
    mkdir -p "$tmp"
    tar -xf "$tarball" -C "$tmp"
    [ -f "$tmp/$source_pkg/Makefile" ] || die "$tarball has no $source_pkg/Makefile"
    mv -T "$tmp/$source_pkg" "$pristine"
    rm -rf "$tmp"
fi

# --- patched tree: hard-linked copy of the pristine tree, patched files unlinked
tree=$cache/src/patched-$tree_key
if [ ! -d "$tree" ]; then
    stage "patch (${#patches[@]} patches) into $tree"
    tmp=$cache/src/.tmp-patched-$$
    cp -al "$pristine" "$tmp"
    for p in "${patches[@]}"; do
        # Give each file the patch touches its own inode first, so patching
        # never writes through a hard link into the pristine tree.
        while IFS= read -r f; do
            [ -f "$tmp/$f" ] || continue
            cp "$tmp/$f" "$tmp/$f.husk-unlink" && mv -f "$tmp/$f.husk-unlink" "$tmp/$f"
        done < <(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$here/$p")
        patch -d "$tmp" -p1 --forward --batch --quiet --dry-run <"$here/$p" >&2 ||
            die "$p does not apply cleanly to $source_pkg $pkg_version; refresh it against that source"
        patch -d "$tmp" -p1 --forward --batch --quiet <"$here/$p" >&2
        log "applied $p"
    done
    mv -T "$tmp" "$tree"
fi

# --- configure ---------------------------------------------------------------
obj=$cache/build/$tree_key
mkdir -p "$obj"
kmake() {
    make -C "$tree" O="$obj" KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk "$@" >&2
}

stage "configure: tinyconfig + ${fragments[*]}"
make -C "$tree" O="$obj" tinyconfig >"$obj/tinyconfig.log" 2>&1 ||
    { cat "$obj/tinyconfig.log" >&2; die "make tinyconfig failed (log above)"; }
# -n: allnoconfig semantics, so options that only become visible through a
# fragment (for example RD_GZIP once BLK_DEV_INITRD is on) stay off unless a
# fragment asks for them.
(cd "$tree" && ./scripts/kconfig/merge_config.sh -n -O "$obj" "$obj/.config" \
    "${fragments[@]/#/$here/}") >"$obj/merge_config.log" 2>&1 ||
    { cat "$obj/merge_config.log" >&2; die "merge_config.sh failed (log above)"; }

# Kconfig silently drops options whose dependencies are missing: check that
# every line of every fragment is in the final .config as asked.
check_config() {
    local frag line name want got failed=0
    declare -A asked=()
    for frag in "${fragments[@]}"; do
        while IFS= read -r line; do
            if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
                name=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
            elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
                name=${BASH_REMATCH[1]} want=n
            else
                continue
            fi
            if [ -n "${asked[$name]:-}" ] && [ "${asked[$name]%% *}" != "$want" ]; then
                log "CONFLICT: $name=$want in $frag but ${asked[$name]}"
                failed=1
            fi
            asked[$name]="$want (in $frag)"
            got=$(sed -n "s/^$name=//p" "$obj/.config")
            [ -n "$got" ] || got=n
            if [ "$got" != "$want" ]; then
                log "DROPPED: $frag asks $name=$want, final .config has $name=$got (a dependency is missing; see its Kconfig 'depends on')"
                failed=1
            fi
        done <"$here/$frag"
    done
    [ "$failed" = 0 ] || die "the final .config differs from the fragments (lines above); fix the fragments"
    log "config check: all ${#asked[@]} requested options are set as asked"
}
check_config

# --- build -------------------------------------------------------------------
stage "make -j$jobs vmlinux (first build ~6 min on 2 cores)"
kmake -j"$jobs" vmlinux || die "kernel build failed (make output above; objects in $obj)"

# --- publish atomically ------------------------------------------------------
stage "cache into $out"
tmp=$cache/kernel/.tmp-$key-$$
mkdir -p "$tmp"
cp "$obj/vmlinux" "$tmp/vmlinux"
cp "$obj/System.map" "$tmp/System.map"
cp "$obj/.config" "$tmp/.config"
{
    echo "package: $source_pkg $pkg_version"
    echo "release: $(cat "$obj/include/config/kernel.release")"
    echo "fragments: ${fragments[*]}"
    echo "patches: ${patches[*]}"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(($(date +%s) - started)) s"
} >"$tmp/inputs"
mv -T "$tmp" "$out"
log "done: key $key"
echo "$out/vmlinux"
