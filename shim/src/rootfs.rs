//! The container's root filesystem: containerd sends the snapshot's mounts (an overlay,
//! usually) with `Create`; the shim mounts them on `<bundle>/rootfs`, which the sandbox
//! uses (shared into the VM with virtio-fs, or as libcontainer's root), and unmounts them
//! on `Delete`.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;

/// Errors mounting the rootfs.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RootfsError {
    /// creating the rootfs directory {path:?} failed: {source}
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// mounting the {fstype} rootfs from {source_path:?} on {target:?} failed: {message}
    Mount {
        fstype: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
}

/// Where the rootfs goes in a bundle.
pub fn target(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts `mounts` on `<bundle>/rootfs`; on failure, unmounts what was mounted. Returns
/// whether anything was mounted (no mounts: the bundle brings its own rootfs).
pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<bool, RootfsError> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = target(bundle);
    std::fs::create_dir_all(&target).map_err(|source| RootfsError::Dir {
        path: target.clone(),
        source,
    })?;
    for m in mounts {
        if let Err(e) = mount_one(m, &target) {
            unmount(bundle);
            return Err(RootfsError::Mount {
                fstype: m.type_.clone(),
                source_path: m.source.clone(),
                target,
                message: e.to_string(),
            });
        }
    }
    Ok(true)
}

/// Mounts one of containerd's mounts in this process. (The crate's `mount_rootfs` forks
/// and waits through its own reaper, which this shim does not run.)
fn mount_one(m: &Mount, target: &Path) -> nix::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        Some(m.type_.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

/// Unmounts everything under `<bundle>/rootfs` (lazily: a process that still holds it
/// must not make delete fail). Errors are logged: there is nothing more to do.
pub fn unmount(bundle: &Path) {
    let target = target(bundle);
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), libc::MNT_DETACH) {
        log::warn!("unmounting {target:?}: {e}");
    }
}
