//! Templates: a snapshot of a guest taken once its agent is ready and before any share
//! is mounted, from which later sandboxes of the same configuration start instead of
//! booting (design.md, "Fast start").
//!
//! A template is keyed by what the guest's state depends on: kernel and initramfs (their
//! contents), vCPUs, memory, the command line (husk's own and the extra) and the CPU
//! template. The key names
//! the file, `<dir>/<key>.snap`; the snapshot itself carries the VM's full fingerprint,
//! which the restore checks, so a stale or foreign file is refused and rebuilt.
//!
//! Guests restored from one template share its clock and random state until the host
//! sends `RefreshAfterRestore` (the agent sets the clock and reseeds the kernel's
//! generator with host entropy): [`refresh`] is the first thing done after a restore.

use std::path::{Path, PathBuf};

use husk_protocol::client::{AgentClient, ClientError};

use super::boot::cmdline;
use super::config::{BootSource, VmConfig};
use super::snapshot::{fingerprint, SnapshotError};
use super::vm::{RunError, Vm};
use crate::host::HostMode;

/// Bytes of host entropy each restored guest gets (the kernel keys its generator with
/// 32).
const ENTROPY_BYTES: usize = 64;

/// Where the template for `config` lives in `dir`.
pub fn path_for(dir: &Path, config: &VmConfig) -> Result<PathBuf, SnapshotError> {
    let extra = match &config.boot {
        BootSource::Linux { cmdline_extra, .. } => cmdline_extra.as_str(),
        _ => "",
    };
    // husk's own command line too: a changed cmdline.pvm (e.g. the agent's environment)
    // must not restore a guest booted with the old one.
    let own = match config.host_mode {
        HostMode::Pvm => format!("{} {}", cmdline::base(), cmdline::pvm_compat()),
        _ => cmdline::base().to_string(),
    };
    let key = fingerprint(
        config.vcpus,
        config.mem_mib,
        &config.boot,
        &format!("{extra}\0cpu template {:?}\0{own}", config.cpu_template),
    )?;
    Ok(dir.join(format!("{}.snap", key.hex())))
}

/// Writes `vm`'s snapshot to `path` atomically (a reader never sees half a file, and two
/// sandboxes making the same template at once both end with a whole one). The vCPUs are
/// left paused.
pub fn save(vm: &Vm, path: &Path) -> Result<(), RunError> {
    let io = |what: &'static str, source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the template directory", e))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if let Err(e) = vm.snapshot(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("renaming the new template to", e).into()
    })
}

/// Errors refreshing a restored guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RefreshError {
    /// drawing entropy for the restored guest from the host (getrandom) failed: {0}
    Entropy(#[source] std::io::Error),
    /// giving the restored guest its clock and entropy failed: {0}
    Agent(#[from] ClientError),
}

/// Gives a freshly restored guest the host's time and its own entropy.
pub fn refresh(agent: &mut AgentClient) -> Result<(), RefreshError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let entropy = super::entropy::host_random(ENTROPY_BYTES).map_err(RefreshError::Entropy)?;
    Ok(agent.refresh_after_restore(now.as_nanos() as u64, entropy)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &Path, extra: &str, vcpus: u8) -> VmConfig {
        let mut c = VmConfig::new(BootSource::Linux {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline_extra: extra.into(),
        });
        c.vcpus = vcpus;
        c
    }

    #[test]
    fn the_key_follows_what_the_guest_state_depends_on() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel one").unwrap();
        let base = path_for(dir.path(), &config(&kernel, "", 1)).unwrap();
        assert_eq!(base.parent(), Some(dir.path()));
        assert_eq!(base, path_for(dir.path(), &config(&kernel, "", 1)).unwrap());
        assert_ne!(
            base,
            path_for(dir.path(), &config(&kernel, "quiet", 1)).unwrap()
        );
        assert_ne!(base, path_for(dir.path(), &config(&kernel, "", 2)).unwrap());
        std::fs::write(&kernel, b"kernel two").unwrap();
        assert_ne!(base, path_for(dir.path(), &config(&kernel, "", 1)).unwrap());
    }
}
