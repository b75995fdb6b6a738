//! The real guest: a microVM ([`crate::vmm::guest::GuestVm`]) with a hybrid vsock
//! device and the sandbox share over virtio-fs; its sockets live in the run directory.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::GuestKind;
use super::guest::{GuestAddress, GuestBackend, GuestError};
use crate::net::guest::{AttachRecord, RECORD_FILE};
use crate::net::NetnsAttachment;
use crate::vmm::config::NetDeviceConfig;
use crate::vmm::guest::{GuestNet, GuestVm, GuestVmConfig, GUEST_SHARE_DIR, VSOCK_SOCKET};
use crate::vmm::ConsoleOutput;

/// What a jail's launcher hands the jailed vmm (see [`super::jailed`]): everything that
/// needs the host's view, made before the jail.
#[derive(Debug)]
pub struct Handed {
    /// The connection to the virtiofsd started on the host share.
    pub virtiofsd: Arc<UnixStream>,
    /// The NIC over a tap opened in the container's network namespace.
    pub net: Option<GuestNet>,
    /// The template to restore from: the launcher's host path, replaced by the path in
    /// the jail once inside it.
    pub template: Option<PathBuf>,
}

/// A microVM booted from `kernel` + `initrd`.
pub struct MicroVm {
    kernel: PathBuf,
    initrd: PathBuf,
    vcpus: u8,
    mem_mib: u64,
    template_dir: Option<PathBuf>,
    /// The network namespace to attach to (the spec's `network` namespace path).
    netns: Option<PathBuf>,
    /// Kept for the sandbox's life; its filters outlive the daemon when it is confined,
    /// so `husk delete` removes them from the record (see [`crate::net::guest`]).
    net: Option<NetnsAttachment>,
    /// Set in a jailed vmm: the guest is started from these instead.
    handed: Option<Handed>,
    vm: Option<GuestVm>,
}

/// Kernel arguments of every sandbox's guest. `quiet`: only kernel warnings and errors
/// (and the agent's own lines) reach the console log. Each console byte is a port write
/// the VMM handles, driven by emulated guest-kernel code on PVM hosts: measured 24.05 s
/// to agent ready instead of 25.84 s (medians of 3 alternating boots of the root disk,
/// release husk, 1 vCPU / 128 MiB: `bench/kernel_args_ab.sh 3 quiet`).
pub const SANDBOX_KERNEL_ARGS: &str = "quiet";

impl MicroVm {
    /// None when `kind` is not a VM.
    pub fn new(kind: &GuestKind) -> Option<Self> {
        match kind {
            GuestKind::Vm {
                kernel,
                initrd,
                vcpus,
                mem_mib,
                template_dir,
            } => Some(Self {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                vcpus: *vcpus,
                mem_mib: *mem_mib,
                template_dir: template_dir.clone(),
                netns: None,
                net: None,
                handed: None,
                vm: None,
            }),
            GuestKind::HostAgent { .. } => None,
        }
    }

    /// Attach the guest to the network namespace at `netns` when it starts.
    pub fn with_netns(mut self, netns: Option<PathBuf>) -> Self {
        self.netns = netns;
        self
    }

    /// In a jail: boot from `kernel` and `initrd` (paths inside the jail) and what the
    /// launcher handed over, instead of starting virtiofsd or attaching the network here.
    pub fn jailed(mut self, kernel: PathBuf, initrd: PathBuf, handed: Handed) -> Self {
        self.kernel = kernel;
        self.initrd = initrd;
        self.template_dir = None;
        self.handed = Some(handed);
        self
    }

    /// The guest's configuration with the sockets in `run_dir`.
    ///
    /// Sandboxes boot with [`SANDBOX_KERNEL_ARGS`]; `husk vmm boot` shows the full kernel
    /// log for debugging a guest.
    pub fn guest_config(&self, share_dir: &Path, run_dir: &Path) -> GuestVmConfig {
        let mut config = GuestVmConfig::new(run_dir, share_dir);
        config.kernel = Some(self.kernel.clone());
        config.initrd = Some(self.initrd.clone());
        config.vcpus = self.vcpus;
        config.mem_mib = self.mem_mib;
        // The daemon's stdio is the container's: the guest console goes to the log.
        config.console = ConsoleOutput::Log;
        config.cmdline_extra = SANDBOX_KERNEL_ARGS.into();
        // With a NIC the guest boots cold (a template has none; GuestVm decides).
        config.template_dir = self.template_dir.clone();
        config
    }

    /// For a jail's launcher: attaches the network namespace given by
    /// [`MicroVm::with_netns`] (records in `run_dir`), if any.
    pub fn attach_netns(&mut self, run_dir: &Path) -> Result<Option<GuestNet>, GuestError> {
        match self.netns.clone() {
            Some(netns) => self.attach(&netns, run_dir).map(Some),
            None => Ok(None),
        }
    }

    /// Creates the tap and the redirects in the namespace and records them in `run_dir`
    /// first, so that `husk delete` finds them whatever happens to the daemon.
    fn attach(&mut self, netns: &Path, run_dir: &Path) -> Result<GuestNet, GuestError> {
        let mut attachment = NetnsAttachment::create(netns)?;
        let record = AttachRecord {
            netns: netns.to_path_buf(),
            interface: attachment.interface().name.clone(),
        };
        if let Err(source) = record.write(run_dir) {
            let _ = attachment.remove();
            return Err(GuestError::NetRecord {
                path: run_dir.join(RECORD_FILE),
                source,
            });
        }
        log::info!(
            "attached to {}: {:?}",
            netns.display(),
            attachment.interface()
        );
        let device = attachment.take_tap().map(|tap| NetDeviceConfig {
            tap: std::sync::Arc::new(tap),
            config: attachment.net_config(),
        });
        let interface = attachment.interface().clone();
        self.net = Some(attachment);
        match device {
            Some(device) => Ok(GuestNet { device, interface }),
            None => {
                self.detach(run_dir);
                Err(GuestError::NotStarted("attach the network twice"))
            }
        }
    }

    /// Undoes [`MicroVm::attach`] after a failed start (the daemon is not confined yet).
    pub fn detach(&mut self, run_dir: &Path) {
        if let Some(attachment) = self.net.take() {
            if let Err(e) = attachment.remove() {
                log::error!("removing the network attachment: {e}");
            }
            let _ = std::fs::remove_file(run_dir.join(RECORD_FILE));
        }
    }

    fn running(&self, what: &'static str) -> Result<&GuestVm, GuestError> {
        self.vm.as_ref().ok_or(GuestError::NotStarted(what))
    }
}

impl GuestBackend for MicroVm {
    fn start(&mut self, share_dir: &Path, run_dir: &Path) -> Result<GuestAddress, GuestError> {
        let mut config = self.guest_config(share_dir, run_dir);
        if let Some(handed) = self.handed.take() {
            config.virtiofsd_connection = Some(handed.virtiofsd);
            config.net = handed.net;
            config.template_file = handed.template;
        } else if let Some(netns) = self.netns.clone() {
            config.net = Some(self.attach(&netns, run_dir)?);
        }
        let vm = match GuestVm::boot(config) {
            Ok(vm) => vm,
            Err(e) => {
                self.detach(run_dir);
                return Err(e.into());
            }
        };
        log::info!(
            "guest agent ready after {:?} ({})",
            vm.ready_after(),
            if vm.started_from_template() {
                "restored from a template"
            } else {
                "cold boot"
            }
        );
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
        // The tap went with the VM; the redirects stay for `husk delete` (a confined
        // daemon cannot run `tc`), which removes them from the record.
        self.net = None;
    }
}
