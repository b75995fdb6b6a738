//! The real guest: a microVM ([`crate::vmm::guest::GuestVm`]) with a hybrid vsock
//! device and the sandbox share over virtio-fs; its sockets live in the run directory.

use std::path::{Path, PathBuf};

use super::config::GuestKind;
use super::guest::{GuestAddress, GuestBackend, GuestError};
use crate::vmm::guest::{GuestVm, GuestVmConfig, GUEST_SHARE_DIR, VSOCK_SOCKET};
use crate::vmm::ConsoleOutput;

/// A microVM booted from `kernel` + `initrd`.
pub struct MicroVm {
    kernel: PathBuf,
    initrd: PathBuf,
    vcpus: u8,
    mem_mib: u64,
    vm: Option<GuestVm>,
}

impl MicroVm {
    /// None when `kind` is not a VM.
    pub fn new(kind: &GuestKind) -> Option<Self> {
        match kind {
            GuestKind::Vm {
                kernel,
                initrd,
                vcpus,
                mem_mib,
            } => Some(Self {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                vcpus: *vcpus,
                mem_mib: *mem_mib,
                vm: None,
            }),
            GuestKind::HostAgent { .. } => None,
        }
    }

    fn running(&self, what: &'static str) -> Result<&GuestVm, GuestError> {
        self.vm.as_ref().ok_or(GuestError::NotStarted(what))
    }
}

impl GuestBackend for MicroVm {
    fn start(&mut self, share_dir: &Path, run_dir: &Path) -> Result<GuestAddress, GuestError> {
        let mut config = GuestVmConfig::new(run_dir, share_dir);
        config.kernel = Some(self.kernel.clone());
        config.initrd = Some(self.initrd.clone());
        config.vcpus = self.vcpus;
        config.mem_mib = self.mem_mib;
        // The daemon's stdio is the container's: the guest console goes to the log.
        config.console = ConsoleOutput::Log;
        let vm = GuestVm::boot(config)?;
        log::info!("guest agent ready after {:?}", vm.ready_after());
        self.vm = Some(vm);
        Ok(GuestAddress::HybridVsock {
            socket: run_dir.join(VSOCK_SOCKET),
        })
    }

    fn guest_share_dir(&self, _share_dir: &Path) -> PathBuf {
        PathBuf::from(GUEST_SHARE_DIR)
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        Ok(self.running("pause")?.pause()?)
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        Ok(self.running("resume")?.resume()?)
    }

    fn stop(&mut self) {
        if let Some(vm) = self.vm.take() {
            match vm.shutdown() {
                Ok(outcome) => log::info!("guest ended: {:?}", outcome.exit),
                Err(e) => log::error!("stopping the guest: {e}"),
            }
        }
    }
}
