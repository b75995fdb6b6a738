//! `MountShare`: the guest mounts a virtio-fs share (the sandbox's directory of container
//! rootfs) where the host asks. Done on request, not at boot, so that a guest restored
//! from a snapshot mounts the share it is given after the restore.

use std::path::Path;

use husk_protocol::{AgentError, Response};
use nix::mount::{mount, MsFlags};

/// Longest virtio-fs tag (virtio 1.2, 5.11.4).
const MAX_TAG_LEN: usize = 36;

/// Mounts virtio-fs `tag` at `mountpoint`. Only PID 1 does: on the host (tier-2 tests)
/// there is no virtio-fs device to mount.
pub fn mount_share(tag: &str, mountpoint: &Path, readonly: bool) -> Result<Response, AgentError> {
    if std::process::id() != 1 {
        return Err(AgentError::Unsupported {
            what: "MountShare outside a VM (there is no virtio-fs device on the host)".into(),
        });
    }
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
        return Err(AgentError::InvalidRequest {
            reason: format!("virtio-fs tag {tag:?} must be 1 to 36 bytes without NUL"),
        });
    }
    if !mountpoint.is_absolute() {
        return Err(AgentError::InvalidRequest {
            reason: format!(
                "share mountpoint {} must be an absolute path",
                mountpoint.display()
            ),
        });
    }
    std::fs::create_dir_all(mountpoint).map_err(|e| AgentError::Io {
        context: format!("creating the share mountpoint {}", mountpoint.display()),
        message: e.to_string(),
    })?;
    // No nosuid/nodev: the share holds container rootfs, which must behave as they do
    // under runc on the host (setuid binaries included).
    let mut flags = MsFlags::empty();
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(tag), mountpoint, Some("virtiofs"), flags, None::<&str>).map_err(|e| {
        AgentError::Io {
            context: format!(
                "mounting virtio-fs tag {tag:?} at {} (is the share attached to the VM?)",
                mountpoint.display()
            ),
            message: e.to_string(),
        }
    })?;
    Ok(Response::Done)
}
