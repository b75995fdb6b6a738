//! The per-sandbox share: `<entry>/share/` goes to the guest over virtio-fs, and the
//! bundle's rootfs is bind-mounted at `share/<id>/rootfs` (read-only when
//! `root.readonly`), which the agent uses as the container's rootfs.
//!
//! Removal never recurses through the mount point: after the unmount the directories
//! are removed one by one with `rmdir`, so a mount that is somehow still there makes
//! `delete` fail with a clear error instead of deleting the bundle's files.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors setting up or removing the share.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ShareError {
    /// the bundle rootfs {0:?} is not a directory: fix root.path in config.json
    NoRootfs(PathBuf),
    /// creating the share directory {path:?} failed: {source}
    Mkdir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// bind-mounting the rootfs {from:?} at {to:?} failed: {source}
    Bind {
        from: PathBuf,
        to: PathBuf,
        source: nix::Error,
    },
    /// unmounting the rootfs at {path:?} failed ({source}): find what holds it with `fuser -m`, then `husk delete --force` again
    Unmount { path: PathBuf, source: nix::Error },
    /// removing {path:?} failed ({source}): it is not empty, so something is still mounted or was written there; nothing was deleted recursively
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates the share and the rootfs bind mount. On failure nothing is left.
pub fn prepare(
    share_dir: &Path,
    mount_point: &Path,
    rootfs: &Path,
    readonly: bool,
) -> Result<(), ShareError> {
    if !rootfs.is_dir() {
        return Err(ShareError::NoRootfs(rootfs.to_path_buf()));
    }
    std::fs::create_dir_all(mount_point).map_err(|source| ShareError::Mkdir {
        path: mount_point.to_path_buf(),
        source,
    })?;
    let bound = bind(rootfs, mount_point, readonly);
    if bound.is_err() {
        let _ = remove(share_dir, mount_point);
    }
    bound
}

fn bind(rootfs: &Path, mount_point: &Path, readonly: bool) -> Result<(), ShareError> {
    let err = |source| ShareError::Bind {
        from: rootfs.to_path_buf(),
        to: mount_point.to_path_buf(),
        source,
    };
    let none: Option<&str> = None;
    mount(
        Some(rootfs),
        mount_point,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(err)?;
    // Private: mounts made later under the bundle's rootfs on the host must not
    // propagate into the guest's view, nor ours back.
    let _ = mount(
        none,
        mount_point,
        none,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        none,
    );
    if readonly {
        // A bind mount is made read-only by a remount of the bind itself.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(none, mount_point, none, flags, none) {
            let _ = umount2(mount_point, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
    }
    Ok(())
}

/// Is `path` a mount point? (Its device differs from its parent's, or it is listed.)
fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp.replace("\\040", " ") == want)
}

/// Unmounts the rootfs and removes the share's directories without recursing.
/// Missing pieces are fine, so it can run after a partial create.
pub fn remove(share_dir: &Path, mount_point: &Path) -> Result<(), ShareError> {
    while is_mounted(mount_point) {
        umount2(mount_point, MntFlags::MNT_DETACH).map_err(|source| ShareError::Unmount {
            path: mount_point.to_path_buf(),
            source,
        })?;
    }
    let mut dir = Some(mount_point);
    while let Some(d) = dir {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShareError::Remove {
                    path: d.to_path_buf(),
                    source,
                })
            }
        }
        dir = if d == share_dir {
            None
        } else {
            d.parent().filter(|p| p.starts_with(share_dir))
        };
    }
    Ok(())
}
