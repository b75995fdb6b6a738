//! Everything written into the guest or the vCPUs before the first instruction runs.

pub mod cmdline;
pub mod cpu_template;
pub mod cpuid;
pub mod loader;
pub mod mptable;
pub mod msrs;
pub mod regs;

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    /// the guest program ({len} bytes at {addr:#x}) does not fit in guest memory or overlaps the boot tables (load it at or above {HIMEM_START:#x} for long mode, or between 0x1000 and 0x7000 for real mode)
    RawProgram { addr: u64, len: usize },
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: u64,
    pub mode: CpuMode,
    pub zero_page: u64,
}

/// Loads a Linux kernel, its initramfs, the command line, boot_params and the MP table.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let (entry, kernel_end) = loader::load_kernel(mem, kernel)?;
    let initrd = initrd
        .map(|path| loader::load_initrd(mem, path, kernel_end))
        .transpose()?;
    loader::write_boot_params(mem, cmdline, initrd)?;
    mptable::write(mem, vcpus)?;
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
    mptable::write(mem, vcpus)?;
    if mode == CpuMode::Long {
        regs::write_long_mode_tables(mem)?;
    }
    Ok(BootEntry {
        entry,
        mode,
        zero_page: 0,
    })
}
