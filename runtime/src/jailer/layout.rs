//! Where a VM's jail lives and what is in it:
//! `<root>/<id>/jail/` (becomes `/` of the vmm) holding the kernel and initrd (hard links,
//! or copies across filesystems), `dev/` (a private tmpfs with `kvm`, later `net/tun`)
//! and `run/` (the vmm's sockets, owned by the jail user).

use std::path::{Path, PathBuf};

use super::JailError;

/// The jail user's uids and gids are taken from `[JAIL_ID_BASE, JAIL_ID_BASE + JAIL_ID_SPAN)`,
/// far above login users and the usual subuid ranges.
pub const JAIL_ID_BASE: u32 = 1_000_000_000;
pub const JAIL_ID_SPAN: u32 = 1_000_000;

/// A per-VM uid (= gid) derived from the container id (FNV-1a), so two VMs almost never
/// share a user and cannot signal or ptrace each other; the same id always gets the same
/// uid, so `delete` can find what `create` made.
pub fn uid_for(id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    JAIL_ID_BASE + h % JAIL_ID_SPAN
}

/// The paths of one VM's jail on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLayout {
    /// `<root>/<id>`: removed as a whole by `Jail::remove`.
    pub vm_dir: PathBuf,
    /// `<root>/<id>/jail`: the vmm's `/`.
    pub jail: PathBuf,
}

impl JailLayout {
    pub fn new(root: &Path, id: &str) -> Result<Self, JailError> {
        crate::oci::id::validate(id).map_err(|e| JailError::Id(e.to_string()))?;
        if !root.is_absolute() {
            return Err(JailError::RelativeRoot(root.to_path_buf()));
        }
        let vm_dir = root.join(id);
        Ok(Self {
            jail: vm_dir.join("jail"),
            vm_dir,
        })
    }

    pub fn dev_dir(&self) -> PathBuf {
        self.jail.join("dev")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.jail.join("run")
    }

    /// Where the jail's copy of `file` goes, and its path as the vmm sees it.
    pub fn boot_file(&self, file: &Path) -> Result<(PathBuf, PathBuf), JailError> {
        let name = file
            .file_name()
            .ok_or_else(|| JailError::NotAFile(file.to_path_buf()))?;
        Ok((self.jail.join(name), Path::new("/").join(name)))
    }
}
