#!/usr/bin/env bash
# Sets up everything husk needs on a fresh Debian 12 x86_64 machine (as root) and builds it:
# Debian packages, the guest kernel (cached outside the repo, keyed by content), the
# workspace, the static guest agent, the guest initramfs, the demo bundle and the OCI image
# tarball. Outputs go to target/husk/. Safe to run again: finished steps are quick.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

APT_PACKAGES=(
    build-essential pkg-config   # C toolchain for -sys crates and the kernel
    libseccomp-dev libcap-ng-dev # libcontainer (static libseccomp.a for the agent), virtiofsd
    busybox-static cpio          # the demo/test rootfs; cpio for inspecting initramfs files
    e2fsprogs                    # mke2fs/debugfs: the guest root disk image and its tests
    runc                         # reference runtime for the CLI conformance suite
    containerd docker.io         # engines driving husk in the full-path shim and Docker tests
    flex bison libelf-dev bc xz-utils linux-source-6.1 # the guest kernel
    iperf3                       # bench/net.sh: TCP throughput, husk-vm vs runc
    python3                      # bench/boot_profile.py (and its check in the lint tier)
)

install_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages (${missing[*]}): run as root or install them"
    stage "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

check_toolchain() {
    command -v cargo >/dev/null ||
        die "cargo not found: install the Rust toolchain (rustup) first"
}

build_kernel() {
    stage "guest kernel (cached in $HUSK_CACHE/kernel; the first build takes ~6 min)"
    local vmlinux
    vmlinux=$("$HUSK_REPO/guest-kernel-config/build.sh" | tail -n 1)
    [ -f "$vmlinux" ] || die "guest-kernel-config/build.sh did not produce vmlinux (got '$vmlinux')"
    ln -sfn "$vmlinux" "$HUSK_OUT/vmlinux"
}

# virtiofsd, the virtio-fs backend the VMM starts per sandbox, from crates.io (needs
# libseccomp-dev and libcap-ng-dev). Cached per version outside the repo; the runtime finds
# it at target/husk/virtiofsd (or HUSK_VIRTIOFSD, or PATH).
VIRTIOFSD_VERSION=1.14.0
install_virtiofsd() {
    local root="$HUSK_CACHE/virtiofsd-$VIRTIOFSD_VERSION"
    if [ ! -x "$root/bin/virtiofsd" ]; then
        stage "virtiofsd $VIRTIOFSD_VERSION (cargo install, ~1 min, cached in $root)"
        cargo install virtiofsd --version "$VIRTIOFSD_VERSION" --locked --quiet --root "$root"
    fi
    ln -sfn "$root/bin/virtiofsd" "$HUSK_OUT/virtiofsd"
}

# dockerd from Debian 13 (trixie): bookworm's docker.io 20.10 cannot run a containerd shim
# v2 (`--runtime io.containerd.husk.v2`, `runtimeType` in daemon.json: Moby 23+). trixie's
# dockerd needs only glibc 2.34 and containerd >= 1.4, so it runs here next to bookworm's
# containerd and docker CLI. Downloaded with an apt state of its own (the system's sources
# and packages stay bookworm's), unpacked, cached per version outside the repo; the tests
# find it at target/husk/dockerd.
install_dockerd() {
    local apt="$HUSK_CACHE/apt-trixie" have
    have=$(find "$HUSK_CACHE" -maxdepth 2 -path "$HUSK_CACHE/dockerd-*/dockerd" 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$have" ]; then
        stage "dockerd from Debian trixie (own apt state in $apt, cached in $HUSK_CACHE/dockerd-VERSION)"
        local opts=(-qq -o APT::Sandbox::User=root -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$apt/sources"
            -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/state/status"
            -o "Dir::Cache=$apt/cache")
        mkdir -p "$apt/sources" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
        touch "$apt/state/status"
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: trixie" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            >"$apt/sources/trixie.sources"
        apt-get "${opts[@]}" update
        rm -f "$apt/deb"/docker.io_*.deb
        (cd "$apt/deb" && apt-get "${opts[@]}" download docker.io 2>/dev/null)
        local deb version unpacked
        deb=$(ls "$apt/deb"/docker.io_*.deb) || die "could not download docker.io from Debian trixie"
        version=$(dpkg-deb -f "$deb" Version)
        unpacked=$(mktemp -d)
        dpkg-deb -x "$deb" "$unpacked"
        mkdir -p "$HUSK_CACHE/dockerd-$version"
        cp "$unpacked/usr/sbin/dockerd" "$unpacked/usr/sbin/docker-proxy" "$HUSK_CACHE/dockerd-$version/"
        rm -rf "$unpacked"
        have="$HUSK_CACHE/dockerd-$version/dockerd"
    fi
    ln -sfn "$have" "$HUSK_OUT/dockerd"
}

build_workspace() {
    stage "cargo build (workspace)"
    cargo build --workspace --all-targets --quiet
}

# The agent is PID 1 in the guest and must be fully static. libseccomp must be linked
# statically too: a dynamically linked one gives a static-pie that crashes at start
# (shared/substrate.md). relocation-model=static links a plain static executable, not a
# static-pie: no 300 KB of .rela.dyn for the emulated guest kernel to copy out of the
# initramfs (~1 s) and no 12,600 relocations for the agent to apply at start.
build_agent() {
    stage "static guest agent"
    LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
        RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        cargo build --quiet --release -p husk-agent --target x86_64-unknown-linux-gnu
}

build_guest_files() {
    local rootfs="$HUSK_REPO/target/debug/husk-rootfs"
    stage "guest initramfs, demo bundle, OCI image tarball"
    "$rootfs" initramfs --agent "$HUSK_REPO/target/x86_64-unknown-linux-gnu/release/husk-agent" \
        --out "$HUSK_OUT/initramfs.cpio"
    "$rootfs" root-disk --agent "$HUSK_REPO/target/x86_64-unknown-linux-gnu/release/husk-agent" \
        --out "$HUSK_OUT/guest-root.img"
    "$rootfs" bundle --force --out "$HUSK_OUT/bundle"
    "$rootfs" image --out "$HUSK_OUT/busybox-oci.tar"
}

main() {
    cd "$HUSK_REPO"
    mkdir -p "$HUSK_OUT"
    # A clean build (debug and release workspace, the static agent, clippy) takes ~5 GB
    # under target/, a cold kernel build ~2 GB more in the cache.
    need_disk_space "$HUSK_REPO/target" 8
    install_packages
    check_toolchain
    build_kernel
    install_virtiofsd
    install_dockerd
    build_workspace
    build_agent
    build_guest_files
    stage "setup done: artifacts in $HUSK_OUT"
    ls -l "$HUSK_OUT" >&2
}

main "$@"
