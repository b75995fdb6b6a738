//! Everything written into the guest or the vCPUs before the first instruction runs.

pub mod cmdline;
pub mod cpu_template;
pub mod cpuid;
pub mod kernel_notes;
pub mod loader;
pub mod mptable;
pub mod msrs;
pub mod platform;
pub mod regs;

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use self::cmdline::KernelArgs;
use self::regs::CpuMode;
use super::memory::{HIMEM_START, ZERO_PAGE_START};

/// Errors preparing the guest for boot.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BootError {
    /// {0}
    Loader(#[from] loader::LoaderError),
    /// {0}
    Cmdline(#[from] cmdline::CmdlineError),
    /// {0}
    Mptable(#[from] mptable::MptableError),
    /// {0}
    Regs(#[from] regs::RegsError),
    /// cannot read the guest image {path}: {source}
    GuestImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the guest program ({len} bytes at {addr:#x}) does not fit in guest memory or overlaps the boot tables (load it at or above {HIMEM_START:#x} for long mode, or between 0x1000 and 0x7000 for real mode)
    RawProgram { addr: u64, len: usize },
}

/// Where a Linux guest's root file system comes from: the file given as its initrd is
/// either an initramfs (cpio, copied into memory by the boot loader and unpacked by the
/// kernel) or a read-only ext4 root disk image (husk-rootfs root-disk), which the VMM
/// serves as a virtio-blk device and the kernel mounts as `/`: the guest then reads only
/// the pages it touches instead of copying the whole image in emulated code on PVM hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    /// No initrd: the kernel's built-in initramfs.
    Builtin,
    Initramfs(PathBuf),
    Disk(PathBuf),
}

/// The kernel arguments that mount the root disk (the only block device, so `vda`) and
/// run the agent from it. `ro`: the image is shared by every sandbox.
pub const ROOT_DISK_CMDLINE: &str = "root=/dev/vda ro rootfstype=ext4 init=/init";

impl GuestRoot {
    /// Tells the two kinds of image apart by content (an ext2/3/4 superblock magic).
    pub fn of(initrd: Option<&Path>) -> Result<Self, BootError> {
        let Some(path) = initrd else {
            return Ok(Self::Builtin);
        };
        let err = |source| BootError::GuestImage {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(err)?;
        Ok(
            if crate::vmm::devices::virtio::block::is_ext_image(&file).map_err(err)? {
                Self::Disk(path.to_path_buf())
            } else {
                Self::Initramfs(path.to_path_buf())
            },
        )
    }

    /// The image the boot loader copies into memory, if any.
    pub fn initramfs(&self) -> Option<&Path> {
        match self {
            Self::Initramfs(path) => Some(path),
            _ => None,
        }
    }

    /// The image served as the root disk, if any.
    pub fn disk(&self) -> Option<&Path> {
        match self {
            Self::Disk(path) => Some(path),
            _ => None,
        }
    }
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: u64,
    pub mode: CpuMode,
    pub zero_page: u64,
}

/// Loads a Linux kernel, its initramfs, its arguments (command line, init's environment), boot_params and the MP table
/// (routing the devices' `device_irqs`, and the ISA interrupts for a `legacy_pic`).
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    args: &KernelArgs,
    vcpus: u8,
    device_irqs: &[u32],
    legacy_pic: bool,
) -> Result<BootEntry, BootError> {
    let (entry, kernel_end) = loader::load_kernel(mem, kernel)?;
    let initrd = initrd
        .map(|path| loader::load_initrd(mem, path, kernel_end))
        .transpose()?;
    loader::write_boot_params(mem, &args.cmdline, &args.init_env, initrd)?;
    mptable::write(mem, vcpus, device_irqs, legacy_pic)?;
    regs::write_long_mode_tables(mem)?;
    Ok(BootEntry {
        entry,
        mode: CpuMode::Long,
        zero_page: ZERO_PAGE_START,
    })
}

/// Copies a small program into guest memory. Long-mode programs get the boot GDT and
/// identity page tables, real-mode programs run with flat segments at 0.
pub fn load_raw(
    mem: &GuestMemoryMmap,
    code: &[u8],
    load_addr: u64,
    entry: u64,
    mode: CpuMode,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let bad = BootError::RawProgram {
        addr: load_addr,
        len: code.len(),
    };
    let end = load_addr
        .checked_add(code.len() as u64)
        .ok_or(BootError::RawProgram {
            addr: load_addr,
            len: code.len(),
        })?;
    let allowed = match mode {
        CpuMode::Long => load_addr >= HIMEM_START,
        CpuMode::Real => load_addr >= 0x1000 && end <= ZERO_PAGE_START,
    };
    if !allowed {
        return Err(bad);
    }
    mem.write_slice(code, GuestAddress(load_addr))
        .map_err(|_| bad)?;
    mptable::write(mem, vcpus, &[], true)?;
    if mode == CpuMode::Long {
        regs::write_long_mode_tables(mem)?;
    }
    Ok(BootEntry {
        entry,
        mode,
        zero_page: 0,
    })
}
