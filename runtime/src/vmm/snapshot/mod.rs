//! Snapshot and restore: a paused VM's guest RAM and all its state in one file, and a new
//! VM started from it instead of booting (the base of fast start, `design.md`).
//!
//! [`Vm::snapshot`](crate::vmm::Vm::snapshot) pauses the vCPUs, has each save its state on
//! its own thread ([`VcpuState`]), saves the in-kernel irqchip, PIT and clock
//! ([`VmState`]) and the VMM's devices ([`DeviceStates`]), and writes them with guest RAM
//! ([`file`] describes the layout). [`VmBuilder::restore`](crate::vmm::VmBuilder::restore)
//! checks the file and maps its RAM copy-on-write; devices are added as for a boot; then
//! [`VmBuilder::start`](crate::vmm::VmBuilder::start) checks the configuration fingerprint,
//! restores the state and starts the vCPUs where they stopped.
//!
//! ```no_run
//! use husk::vmm::{BootSource, RunOptions, VmBuilder, VmConfig};
//! # let config = || VmConfig::new(BootSource::Linux { kernel: "vmlinux".into(), initrd: None, cmdline_extra: String::new() });
//! let mut vm = VmBuilder::new(config())?.start()?;
//! vm.wait_then_pause(RunOptions { until_ready: true, ready_timeout: None })?;
//! vm.snapshot("template.snap".as_ref())?;
//! drop(vm);
//! let mut restored = VmBuilder::restore(config(), "template.snap".as_ref())?.start()?;
//! restored.wait(RunOptions::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod blob;
pub mod devices;
pub mod file;
pub mod fingerprint;
pub mod memory;
pub mod restore;
pub mod save;
pub mod vcpu;
pub mod vm;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use devices::DeviceStates;
pub use file::{Header, FORMAT_VERSION};
pub use fingerprint::{fingerprint, Fingerprint};
pub use restore::LoadedSnapshot;
pub use save::{save, DeviceInputs};
pub use vcpu::VcpuState;
pub use vm::VmState;

/// Errors saving or restoring a snapshot. Every error that comes from the file says the
/// fix: delete the snapshot (a template is rebuilt on next use) or boot cold.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SnapshotError {
    /// {what} failed: {source}
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// building an MSR list failed: {0}
    MsrList(vmm_sys_util::fam::Error),
    /// KVM refused MSR {index:#x} of vCPU {vcpu} on restore; the snapshot comes from a host with other MSRs: boot cold and make a new snapshot
    MsrRefused { index: u32, vcpu: u8 },
    /// {what} {path}: {source}
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// writing {what} to the snapshot failed: {source}
    Write {
        what: &'static str,
        source: std::io::Error,
    },
    /// not a husk snapshot (bad magic); delete it, it will be rebuilt
    BadMagic,
    /// snapshot format version {found}, but this husk reads version {supported}; delete it, it will be rebuilt
    Version { found: u32, supported: u32 },
    /// the snapshot is truncated in {0}; delete it, it will be rebuilt
    Truncated(&'static str),
    /// the snapshot's VM state does not match its checksum (the file is damaged); delete it, it will be rebuilt
    StateChecksum,
    /// the snapshot's VM state cannot be decoded ({0}); delete it, it will be rebuilt
    Decode(String),
    /// encoding the VM state failed: {0}
    Encode(String),
    /// the snapshot is inconsistent: {0}; delete it, it will be rebuilt
    Inconsistent(String),
    /// snapshot field {field} has {found} bytes but {kind} has {expected}; the snapshot is damaged or from another husk build: delete it
    FieldSize {
        field: &'static str,
        kind: &'static str,
        found: usize,
        expected: usize,
    },
    /// the snapshot was made for another VM configuration (fingerprint {found}, this VM is {expected}: kernel, initramfs, vCPUs, memory or command line differ); boot cold or use a matching snapshot
    Mismatch {
        found: Fingerprint,
        expected: Fingerprint,
    },
    /// the snapshot has {found} {what} but this VM has {expected}; boot cold or use a matching snapshot
    Shape {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    /// mapping the snapshot's guest memory failed: {0}
    MapMemory(String),
    /// vCPU {index}: {reason}
    Vcpu { index: u8, reason: String },
    /// restoring {device} failed: {reason}
    Device {
        device: &'static str,
        reason: String,
    },
}

impl SnapshotError {
    /// True when the snapshot file itself is unusable (damaged, foreign, outdated or made
    /// for another configuration): the caller should boot cold and may rebuild it.
    pub fn snapshot_unusable(&self) -> bool {
        matches!(
            self,
            Self::BadMagic
                | Self::Version { .. }
                | Self::Truncated(_)
                | Self::StateChecksum
                | Self::Decode(_)
                | Self::Inconsistent(_)
                | Self::FieldSize { .. }
                | Self::Mismatch { .. }
                | Self::Shape { .. }
                | Self::MsrRefused { .. }
        )
    }
}

/// Everything but RAM: what the JSON section of the file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub mem_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceStates,
}
