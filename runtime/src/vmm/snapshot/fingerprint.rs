//! Which VM a snapshot belongs to: a SHA-256 over everything the guest saw at boot.
//!
//! A snapshot restored into a different configuration would run a guest whose memory
//! disagrees with its devices, vCPU count or RAM size, so the header carries this hash and
//! a restore compares it first. Kernel and initramfs files are identified by path, size,
//! inode and modification time rather than hashed whole: hashing 20 MB on every restore
//! would cost more than the rest of the restore, and a rebuilt file changes its mtime.
//! The price is that a file copied elsewhere does not match (a cold boot, not an error).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::SnapshotError;
use crate::vmm::config::BootSource;

/// The identity of a VM configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Lower-case hex, e.g. for a template directory name.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<(), SnapshotError> {
    let meta = std::fs::metadata(path).map_err(|source| SnapshotError::Io {
        what: "reading the metadata of",
        path: path.to_owned(),
        source,
    })?;
    // The file's identity, not its name: a jailed vmm sees the same kernel (a hard link,
    // same inode) as `/vmlinux`, and its restore must match the template its launcher made.
    for v in [
        meta.len(),
        meta.ino(),
        meta.dev(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
    ] {
        h.update(v.to_le_bytes());
    }
    Ok(())
}

/// The fingerprint of a VM with `vcpus`, `mem_mib` MiB, booted from `boot` with the full
/// kernel command line `cmdline` (which names the virtio-mmio devices).
pub fn fingerprint(
    vcpus: u8,
    mem_mib: u64,
    boot: &BootSource,
    cmdline: &str,
) -> Result<Fingerprint, SnapshotError> {
    let mut h = Sha256::new();
    h.update(b"husk-vm-fingerprint-1\0");
    h.update([vcpus]);
    h.update(mem_mib.to_le_bytes());
    match boot {
        BootSource::Linux { kernel, initrd, .. } => {
            h.update(b"linux\0");
            hash_file(&mut h, kernel)?;
            if let Some(initrd) = initrd {
                h.update(b"initrd\0");
                hash_file(&mut h, initrd)?;
            }
        }
        BootSource::Raw {
            code,
            load_addr,
            entry,
            mode,
        } => {
            h.update(b"raw\0");
            h.update((code.len() as u64).to_le_bytes());
            h.update(code);
            h.update(load_addr.to_le_bytes());
            h.update(entry.to_le_bytes());
            h.update(format!("{mode:?}").as_bytes());
        }
    }
    h.update((cmdline.len() as u64).to_le_bytes());
    h.update(cmdline.as_bytes());
    Ok(Fingerprint(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::CpuMode;

    fn raw(code: Vec<u8>) -> BootSource {
        BootSource::Raw {
            code,
            load_addr: 0x1000,
            entry: 0x1000,
            mode: CpuMode::Long,
        }
    }

    #[test]
    fn every_input_changes_the_fingerprint() {
        let base = fingerprint(1, 32, &raw(vec![1]), "console=ttyS0").unwrap();
        assert_eq!(
            base,
            fingerprint(1, 32, &raw(vec![1]), "console=ttyS0").unwrap()
        );
        for other in [
            fingerprint(2, 32, &raw(vec![1]), "console=ttyS0").unwrap(),
            fingerprint(1, 64, &raw(vec![1]), "console=ttyS0").unwrap(),
            fingerprint(1, 32, &raw(vec![2]), "console=ttyS0").unwrap(),
            fingerprint(1, 32, &raw(vec![1]), "console=ttyS1").unwrap(),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_rewritten_kernel_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"one").unwrap();
        let boot = BootSource::Linux {
            kernel: kernel.clone(),
            initrd: None,
            cmdline_extra: String::new(),
        };
        let first = fingerprint(1, 128, &boot, "").unwrap();
        std::fs::write(&kernel, b"other").unwrap();
        assert_ne!(first, fingerprint(1, 128, &boot, "").unwrap());
        let missing = BootSource::Linux {
            kernel: dir.path().join("gone"),
            initrd: None,
            cmdline_extra: String::new(),
        };
        let err = fingerprint(1, 128, &missing, "").unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }
}
