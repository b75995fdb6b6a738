//! What a VM is made of: the typed configuration the builder turns into a running VM.

use std::path::PathBuf;

use super::boot::cpu_template::CpuTemplate;
use super::boot::regs::CpuMode;
use super::devices::serial::ConsoleOutput;
use super::devices::virtio::net::{NetConfig, Tap};
use crate::host::HostMode;

/// Default guest size for `husk vmm boot` and sandboxes.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// A VM to build.
#[derive(Debug)]
pub struct VmConfig {
    pub vcpus: u8,
    /// The CPUID model the vCPUs present (`--cpu-template`).
    pub cpu_template: CpuTemplate,
    pub mem_mib: u64,
    pub boot: BootSource,
    pub console: ConsoleOutput,
    /// Forward the VMM's stdin to the guest console.
    pub console_input: bool,
    /// Decides the PVM compatibility command line.
    pub host_mode: HostMode,
    /// The virtio devices the builder creates (vsock, shares).
    pub devices: VirtioDevicesConfig,
}

/// The virtio devices of a VM, created by [`VmBuilder::new`](super::VmBuilder::new) and
/// driven by the VM's event loop.
#[derive(Debug, Clone, Default)]
pub struct VirtioDevicesConfig {
    /// The host-guest channel (the agent's control and stdio streams).
    pub vsock: Option<VsockDeviceConfig>,
    /// Host directories the guest can mount with `mount -t virtiofs TAG DIR`.
    pub shares: Vec<FsShareConfig>,
    /// A NIC whose host end is a tap (made in the container's network namespace).
    pub net: Option<NetDeviceConfig>,
}

/// A virtio-net device over an open tap.
#[derive(Debug, Clone)]
pub struct NetDeviceConfig {
    /// The device gets its own fd on this tap ([`Tap::try_clone`]).
    pub tap: std::sync::Arc<Tap>,
    /// MAC and MTU the guest NIC advertises.
    pub config: NetConfig,
}

/// A hybrid vsock device: host clients connect to `uds_path` and send `CONNECT <port>`.
#[derive(Debug, Clone)]
pub struct VsockDeviceConfig {
    pub uds_path: PathBuf,
    pub guest_cid: u64,
}

/// A host directory served to the guest by virtiofsd.
#[derive(Debug, Clone)]
pub struct FsShareConfig {
    /// The name the guest mounts it by (1 to 36 bytes).
    pub tag: String,
    /// The directory the guest sees as the root of the file system.
    pub dir: PathBuf,
    /// Who runs virtiofsd.
    pub backend: FsBackend,
    /// virtiofsd's vhost-user socket (its directory must exist); named in errors.
    pub socket_path: PathBuf,
}

/// Who runs the virtiofsd behind a share.
#[derive(Debug, Clone)]
pub enum FsBackend {
    /// The VMM starts this virtiofsd binary (see
    /// [`crate::artifacts::Artifact::Virtiofsd`]) and owns the process.
    Spawn { virtiofsd: PathBuf },
    /// A virtiofsd started by someone else, already connected: a jailed vmm gets it from
    /// its launcher (virtiofsd needs the host's view of the share, the jail has none).
    /// Each device built takes its own fd on the connection; the process is not ours to
    /// watch or kill: it exits when the last fd on the connection closes.
    Connected {
        stream: std::sync::Arc<std::os::unix::net::UnixStream>,
    },
}

/// What the boot vCPU starts executing.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux guest: ELF vmlinux, 64-bit entry, optional uncompressed initramfs.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline_extra: String,
    },
    /// A small program copied to `load_addr` and entered at `entry` (tests).
    Raw {
        code: Vec<u8>,
        load_addr: u64,
        entry: u64,
        mode: CpuMode,
    },
}

impl VmConfig {
    /// A 1-vCPU config with the defaults, for `boot`.
    pub fn new(boot: BootSource) -> Self {
        Self {
            vcpus: 1,
            cpu_template: CpuTemplate::default(),
            mem_mib: DEFAULT_MEM_MIB,
            boot,
            console: ConsoleOutput::Stdout,
            console_input: false,
            host_mode: HostMode::detect(),
            devices: VirtioDevicesConfig::default(),
        }
    }
}
