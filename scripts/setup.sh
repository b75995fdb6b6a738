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
    install_packages
    check_toolchain
    build_kernel
    install_virtiofsd
    build_workspace
    build_agent
    build_guest_files
    stage "setup done: artifacts in $HUSK_OUT"
    ls -l "$HUSK_OUT" >&2
}

main "$@"
