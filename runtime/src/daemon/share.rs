//! The per-sandbox share: `<entry>/share/` goes to the guest over virtio-fs, and the
//! bundle's rootfs is bind-mounted at `share/<id>/rootfs` (read-only when
//! `root.readonly`), which the agent uses as the container's rootfs. The spec's bind
//! mounts of host paths are bound at `share/<id>/mounts/<n>` and their sources rewritten
//! to where the guest sees them (as Kata shares volumes), so `-v /host:/ctr` works in a VM.
//!
//! Removal never recurses through the mount point: after the unmount the directories
//! are removed one by one with `rmdir`, so a mount that is somehow still there makes
//! `delete` fail with a clear error instead of deleting the bundle's files.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

use crate::net::guest::{is_bind_mount, NAME_FILES};

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
    /// the bind mount onto {destination} names source {path:?}, which cannot be used ({source}); fix mounts[].source in config.json
    BindSource {
        destination: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// creating the mount point {path:?} in the read-only rootfs failed: {source}
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    /// removing {path:?} failed ({source}): it is not empty, so something is still mounted or was written there; nothing was deleted recursively
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates the share and the rootfs bind mount. On failure nothing is left.
///
/// The share itself becomes a shared mount (a bind onto itself): virtiofsd, started
/// later in a mount namespace of its own, then receives the binds made under the share
/// afterwards, the rootfs of a pod's other containers ([`prepare_member`]).
pub fn prepare(
    share_dir: &Path,
    mount_point: &Path,
    rootfs: &Path,
    readonly: bool,
) -> Result<(), ShareError> {
    bind_into_share(share_dir, mount_point, rootfs, readonly, true)
}

/// Binds a pod member's rootfs at `mount_point` in its sandbox's share (`member_dir` is
/// `share/<member id>`). Unlike the sandbox's own rootfs the bind stays shared, so that
/// unmounting it on the host also unmounts virtiofsd's copy. On failure nothing is left.
pub fn prepare_member(
    member_dir: &Path,
    mount_point: &Path,
    rootfs: &Path,
    readonly: bool,
) -> Result<(), ShareError> {
    bind_into_share(member_dir, mount_point, rootfs, readonly, false)
}

/// Creates `mount_point` and binds `rootfs` there; for a sandbox (`sandbox`), `dir` (the
/// share) becomes a shared mount first and the bind private. On failure what was made up
/// to `dir` is removed.
fn bind_into_share(
    dir: &Path,
    mount_point: &Path,
    rootfs: &Path,
    readonly: bool,
    sandbox: bool,
) -> Result<(), ShareError> {
    if !rootfs.is_dir() {
        return Err(ShareError::NoRootfs(rootfs.to_path_buf()));
    }
    std::fs::create_dir_all(mount_point).map_err(|source| ShareError::Mkdir {
        path: mount_point.to_path_buf(),
        source,
    })?;
    let bound = if sandbox {
        make_shared(dir).and_then(|()| bind(rootfs, mount_point, readonly, true))
    } else {
        bind(rootfs, mount_point, readonly, false)
    };
    if bound.is_err() {
        let _ = remove(dir, mount_point);
    }
    bound
}

/// Makes `dir` a mount point of its own (a bind onto itself) with shared propagation.
fn make_shared(dir: &Path) -> Result<(), ShareError> {
    let none: Option<&str> = None;
    let err = |source| ShareError::Bind {
        from: dir.to_path_buf(),
        to: dir.to_path_buf(),
        source,
    };
    if !is_mounted(dir) {
        mount(Some(dir), dir, none, MsFlags::MS_BIND, none).map_err(err)?;
    }
    mount(none, dir, none, MsFlags::MS_SHARED, none).map_err(err)
}

/// Binds `rootfs` (or any host path) at `mount_point`, read-only if asked, and private
/// if asked.
fn bind(
    rootfs: &Path,
    mount_point: &Path,
    readonly: bool,
    private: bool,
) -> Result<(), ShareError> {
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
    if private {
        // Mounts made later under the bundle's rootfs on the host must not propagate
        // into the guest's view, nor ours back.
        let _ = mount(
            none,
            mount_point,
            none,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            none,
        );
    }
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

/// Where the host bind mounts of the container whose rootfs is mounted at `rootfs_mount`
/// are bound: `share/<id>/mounts`.
pub fn mounts_dir(rootfs_mount: &Path) -> PathBuf {
    rootfs_mount.with_file_name("mounts")
}

/// Makes the spec's bind mounts of host paths reach the guest: each source (a directory
/// or a file) is bound at `host_dir/<n>` in the share, read-only when the mount is, and
/// the mount's source becomes `guest_dir/<n>`, where the agent sees it. The name files
/// are left to `net::guest` (copies), other mounts and relative sources unchanged. On
/// failure, what was bound stays for [`remove`], which undoes it.
pub fn bind_host_mounts(
    spec: &mut Spec,
    host_dir: &Path,
    guest_dir: &Path,
) -> Result<(), ShareError> {
    let Some(mounts) = spec.mounts_mut().as_mut() else {
        return Ok(());
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        let destination = m.destination().to_string_lossy().into_owned();
        if !is_bind_mount(m) || NAME_FILES.contains(&destination.as_str()) {
            continue;
        }
        let Some(source) = m.source().clone().filter(|s| s.is_absolute()) else {
            continue;
        };
        let meta = std::fs::metadata(&source).map_err(|e| ShareError::BindSource {
            destination: destination.clone(),
            path: source.clone(),
            source: e,
        })?;
        let point = host_dir.join(n.to_string());
        let mkdir_err = |source| ShareError::Mkdir {
            path: point.clone(),
            source,
        };
        std::fs::create_dir_all(host_dir).map_err(mkdir_err)?;
        if meta.is_dir() {
            std::fs::create_dir(&point).map_err(mkdir_err)?;
        } else if meta.is_file() {
            std::fs::File::create(&point).map_err(mkdir_err)?;
        } else {
            continue;
        }
        let readonly = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "ro"));
        bind(&source, &point, readonly, true)?;
        m.set_source(Some(guest_dir.join(n.to_string())));
    }
    Ok(())
}

/// Creates the mount points that the spec's mounts need and a read-only rootfs lacks, as
/// runc does in the rootfs before it remounts it read-only: the guest sees a read-only
/// rootfs through a read-only bind and cannot create them itself. A destination inside
/// another mount's destination (`/dev/pts` in the `/dev` tmpfs) is the guest's to create;
/// a path through a symlink is left alone (it could lead out of the rootfs), so the
/// container runtime in the guest reports it. Returns what was created (left in place, as
/// runc leaves its mount points).
pub fn create_mount_points(rootfs: &Path, mounts: &[Mount]) -> Result<Vec<PathBuf>, ShareError> {
    let mut created = Vec::new();
    for m in mounts {
        let dest = m.destination();
        let nested = mounts.iter().any(|other| {
            let o = other.destination();
            o != dest && dest.starts_with(o)
        });
        if !dest.is_absolute() || nested {
            continue;
        }
        created.extend(create_mount_point(rootfs, dest, is_file_bind(m))?);
    }
    Ok(created)
}

/// A bind mount of a regular file needs a file as its mount point.
fn is_file_bind(m: &Mount) -> bool {
    is_bind_mount(m) && m.source().as_ref().is_some_and(|s| s.is_file())
}

/// Walks `dest` below `rootfs` component by component, creating what is missing.
fn create_mount_point(
    rootfs: &Path,
    dest: &Path,
    file: bool,
) -> Result<Option<PathBuf>, ShareError> {
    let parts: Vec<_> = dest
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let mut path = rootfs.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => return Ok(None),
            Ok(meta) if meta.is_dir() || last => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = if last && file {
                    std::fs::File::create(&path).map(drop)
                } else {
                    std::fs::create_dir(&path)
                };
                made.map_err(|source| ShareError::MountPoint {
                    path: path.clone(),
                    source,
                })?;
                if last {
                    return Ok(Some(path));
                }
            }
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// Unmounts and removes each `mounts/<n>` (a directory or a file), then `mounts`.
fn remove_host_mounts(dir: &Path) -> Result<(), ShareError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for point in entries.flatten().map(|e| e.path()) {
        while is_mounted(&point) {
            umount2(&point, MntFlags::MNT_DETACH).map_err(|source| ShareError::Unmount {
                path: point.clone(),
                source,
            })?;
        }
        let removed = match std::fs::symlink_metadata(&point) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&point),
            Ok(_) => std::fs::remove_file(&point),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShareError::Remove {
                    path: point,
                    source,
                })
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ShareError::Remove {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
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

/// Unmounts the host bind mounts and the rootfs and removes the share's directories
/// without recursing. Missing pieces are fine, so it can run after a partial create.
pub fn remove(share_dir: &Path, mount_point: &Path) -> Result<(), ShareError> {
    remove_host_mounts(&mounts_dir(mount_point))?;
    while is_mounted(mount_point) {
        umount2(mount_point, MntFlags::MNT_DETACH).map_err(|source| ShareError::Unmount {
            path: mount_point.to_path_buf(),
            source,
        })?;
    }
    let mut dir = Some(mount_point);
    while let Some(d) = dir {
        // The share's bind onto itself (see [`prepare`]).
        while d == share_dir && is_mounted(d) {
            umount2(d, MntFlags::MNT_DETACH).map_err(|source| ShareError::Unmount {
                path: d.to_path_buf(),
                source,
            })?;
        }
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

#[cfg(test)]
mod tests {
    use oci_spec::runtime::MountBuilder;

    use super::*;

    fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    #[test]
    fn missing_mount_points_are_created_like_runc_does() {
        let root = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let file = host.path().join("f");
        std::fs::write(&file, "x").unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        let mounts = [
            mount("/mnt/data", "tmpfs", Path::new("tmpfs"), &[]),
            mount("/dev", "tmpfs", Path::new("tmpfs"), &[]),
            mount("/dev/pts", "devpts", Path::new("devpts"), &[]),
            mount("/etc/f", "bind", &file, &["rbind"]),
        ];
        let created = create_mount_points(root.path(), &mounts).unwrap();
        assert!(root.path().join("mnt/data").is_dir());
        assert!(
            root.path().join("etc/f").is_file(),
            "a file bind needs a file"
        );
        assert!(
            !root.path().join("dev/pts").exists(),
            "inside the /dev tmpfs: the guest's to create"
        );
        assert_eq!(
            created,
            [root.path().join("mnt/data"), root.path().join("etc/f")]
        );
        // Existing paths are left alone; a second call creates nothing.
        assert!(create_mount_points(root.path(), &mounts)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_symlink_in_the_path_is_not_followed_out_of_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        let mounts = [mount("/evil/x", "tmpfs", Path::new("tmpfs"), &[])];
        assert!(create_mount_points(root.path(), &mounts)
            .unwrap()
            .is_empty());
        assert!(!outside.path().join("x").exists());
    }
}
