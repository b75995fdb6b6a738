//! Loading Linux: the ELF `vmlinux` (64-bit entry), the initramfs below the top of low
//! RAM, the command line, and the zero page (`boot_params`) with the e820 map and
//! `setup_data`: a seed for the kernel's random number generator and, for a kernel that
//! reads it (guest kernel patch 0025), init's environment.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::vmm::memory::{
    low_ram_end, ram_ranges, CMDLINE_START, EBDA_START, HIMEM_START, SETUP_DATA_START,
    ZERO_PAGE_START,
};

/// Errors loading the guest kernel and its inputs.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum LoaderError {
    /// cannot open kernel {path}: {source}; pass an existing ELF vmlinux with --kernel or HUSK_KERNEL
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    /// kernel {path} is not a loadable ELF vmlinux ({source}); pass the uncompressed vmlinux from the kernel build, not a bzImage
    NotElf {
        path: String,
        source: linux_loader::loader::Error,
    },
    /// kernel {path} does not fit in {mem_mib} MiB of guest memory ({source}); raise --mem-mib
    KernelTooBig {
        path: String,
        mem_mib: u64,
        source: linux_loader::loader::Error,
    },
    /// cannot read initramfs {path}: {source}
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    /// guest memory of {mem_mib} MiB is too small for the kernel (ends at {kernel_end:#x}) and the {initrd_len}-byte initramfs; raise --mem-mib
    TooLittleMemory {
        mem_mib: u64,
        kernel_end: u64,
        initrd_len: u64,
    },
    /// writing the initramfs into guest memory failed: {0}
    WriteInitrd(vm_memory::GuestMemoryError),
    /// writing the command line failed: {0}
    WriteCmdline(linux_loader::loader::Error),
    /// writing boot_params failed: {0}
    WriteBootParams(linux_loader::configurator::Error),
    /// drawing a seed for the guest's random number generator from the host (getrandom) failed: {0}
    Seed(std::io::Error),
    /// writing the guest's random number generator seed failed: {0}
    WriteSeed(vm_memory::GuestMemoryError),
    /// init's environment for the guest is {0} bytes, more than the 255 the guest kernel keeps; shorten the upper-case NAME=value arguments of --cmdline-extra or guest-kernel-config/cmdline.pvm
    InitEnvTooLong(usize),
    /// writing init's environment for the guest failed: {0}
    WriteInitEnv(vm_memory::GuestMemoryError),
}

/// Where the kernel landed and where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (`startup_64`).
    pub entry: u64,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The initramfs, if any: (guest address, length).
    pub initrd: Option<(u64, u64)>,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 0x1000;
/// `setup_data` type of a seed for the kernel's generator (asm/bootparam.h).
const SETUP_RNG_SEED: u32 = 9;
/// Bytes of seed: one ChaCha key, what the kernel's generator is keyed with.
const RNG_SEED_LEN: usize = 32;
/// `setup_data` type of init's environment for husk's guest kernel (patch 0025): "Husk".
const SETUP_HUSK_INIT_ENV: u32 = u32::from_le_bytes(*b"Husk");
/// The most bytes of environment patch 0025 keeps (its buffer is 256 with the last NUL).
pub const INIT_ENV_MAX: usize = 255;

/// The `setup_data` node carrying `seed`: next (none), type, length, then the bytes.
/// A kernel with `random.trust_bootloader` (the guest kernel's default) credits it in
/// `setup_arch`, so its generator is ready before the first initcall: without it the
/// guest reached the agent's ready with the generator still unseeded (each early
/// random draw then re-extracted the input pool, and a blocking `getrandom` in a
/// container would wait for entropy an emulated guest gathers slowly).
fn rng_seed_setup_data(seed: &[u8], next: u64) -> Vec<u8> {
    setup_data_node(SETUP_RNG_SEED, seed, next)
}

/// A `setup_data` node: the next node's address (0: none), type, length, then the bytes.
fn setup_data_node(kind: u32, data: &[u8], next: u64) -> Vec<u8> {
    let mut node = Vec::with_capacity(16 + data.len());
    node.extend_from_slice(&next.to_le_bytes());
    node.extend_from_slice(&kind.to_le_bytes());
    node.extend_from_slice(&(data.len() as u32).to_le_bytes());
    node.extend_from_slice(data);
    node
}

/// init's environment as patch 0025 reads it: NUL-separated `NAME=value` strings. On
/// the command line each such argument was walked by every parameter scan and printed
/// twice (~55 k emulated instructions for PVM's `GLIBC_TUNABLES`).
fn init_env_data(vars: &[String]) -> Result<Vec<u8>, LoaderError> {
    let data = vars.join("\0").into_bytes();
    if data.len() > INIT_ENV_MAX {
        return Err(LoaderError::InitEnvTooLong(data.len()));
    }
    Ok(data)
}

/// Loads the ELF kernel at its physical addresses (at or above 1 MiB).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(u64, u64), LoaderError> {
    let shown = path.display().to_string();
    let open_err = |source| LoaderError::OpenKernel {
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            if is_elf {
                // An ELF that fails to load almost always ends past the end of RAM.
                let mem_mib = (mem.last_addr().0 + 1) >> 20;
                LoaderError::KernelTooBig {
                    path: shown.clone(),
                    mem_mib,
                    source,
                }
            } else {
                LoaderError::NotElf {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
    Ok((loaded.kernel_load.0, loaded.kernel_end))
}

/// The initramfs goes as high as it can in low RAM, page aligned, above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, initrd_len: u64) -> Option<u64> {
    let top = low_ram_end(mem_size);
    let addr = top.checked_sub(initrd_len)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Copies the initramfs into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let data = std::fs::read(path).map_err(|source| LoaderError::ReadInitrd {
        path: path.display().to_string(),
        source,
    })?;
    let mem_size = mem.last_addr().0 + 1;
    let len = data.len() as u64;
    let addr = initrd_address(mem_size, kernel_end, len).ok_or(LoaderError::TooLittleMemory {
        mem_mib: mem_size >> 20,
        kernel_end,
        initrd_len: len,
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(LoaderError::WriteInitrd)?;
    Ok((addr, len))
}

/// The e820 map: low RAM up to the EBDA, then RAM from 1 MiB on (split around the hole).
pub fn e820_entries(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut entries = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for range in ram_ranges(mem_size) {
        let start = range.start.max(HIMEM_START);
        if range.end() > start {
            entries.push(boot_e820_entry {
                addr: start,
                size: range.end() - start,
                r#type: E820_RAM,
            });
        }
    }
    entries
}

/// The zero page for a kernel with command line `cmdline_len` bytes long.
pub fn build_boot_params(
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    setup_data: Option<u64>,
) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, len)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    if let Some(addr) = setup_data {
        params.hdr.setup_data = addr;
    }
    let entries = e820_entries(mem_size);
    params.e820_entries = entries.len() as u8;
    params.e820_table[..entries.len()].copy_from_slice(&entries);
    params
}

/// Writes the command line, the `setup_data` list (the RNG seed, then init's
/// environment when there is any) and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    init_env: &[String],
    initrd: Option<(u64, u64)>,
) -> Result<(), LoaderError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoaderError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    let seed = crate::vmm::entropy::host_random(RNG_SEED_LEN).map_err(LoaderError::Seed)?;
    // The environment node follows the seed's, 8-byte aligned.
    let env_at = (SETUP_DATA_START + 16 + RNG_SEED_LEN as u64).next_multiple_of(8);
    let next = if init_env.is_empty() { 0 } else { env_at };
    mem.write_slice(
        &rng_seed_setup_data(&seed, next),
        GuestAddress(SETUP_DATA_START),
    )
    .map_err(LoaderError::WriteSeed)?;
    if !init_env.is_empty() {
        let node = setup_data_node(SETUP_HUSK_INIT_ENV, &init_env_data(init_env)?, 0);
        mem.write_slice(&node, GuestAddress(env_at))
            .map_err(LoaderError::WriteInitEnv)?;
    }
    let params = build_boot_params(mem.last_addr().0 + 1, len, initrd, Some(SETUP_DATA_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(LoaderError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::MMIO_HOLE_START;

    #[test]
    fn e820_skips_the_isa_hole_and_the_mmio_hole() {
        let small = e820_entries(128 << 20);
        let got: Vec<(u64, u64)> = small.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            got,
            vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]
        );
        let big = e820_entries(4 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!({ big[1].addr } + { big[1].size }, MMIO_HOLE_START);
        assert_eq!({ big[2].addr }, 1 << 32);
        assert!(big.iter().all(|e| { e.r#type } == E820_RAM));
    }

    #[test]
    fn the_zero_page_points_at_a_fresh_rng_seed_for_each_boot() {
        let mem = crate::vmm::memory::create_guest_memory(16).unwrap();
        let cmdline = Cmdline::new(64).unwrap();
        let mut seeds = Vec::new();
        for _ in 0..2 {
            write_boot_params(&mem, &cmdline, &[], None).unwrap();
            let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
            assert_eq!({ params.hdr.setup_data }, SETUP_DATA_START);
            let mut node = [0u8; 16 + RNG_SEED_LEN];
            mem.read_slice(&mut node, GuestAddress(SETUP_DATA_START))
                .unwrap();
            assert_eq!(&node[..8], &[0; 8], "next: the seed is the only node");
            assert_eq!(u32::from_le_bytes(node[8..12].try_into().unwrap()), 9);
            let len = u32::from_le_bytes(node[12..16].try_into().unwrap());
            assert_eq!(len as usize, RNG_SEED_LEN);
            seeds.push(node[16..].to_vec());
        }
        assert_ne!(seeds[0], seeds[1], "each boot draws its own seed");
        // Outside the RAM map (no split entry) yet below the kernel, in guest memory.
        let end = SETUP_DATA_START + 16 + RNG_SEED_LEN as u64;
        assert!(e820_entries(16 << 20)
            .iter()
            .all(|e| end <= e.addr || SETUP_DATA_START >= e.addr + e.size));
        assert!(SETUP_DATA_START >= EBDA_START + 0x400 && end <= HIMEM_START);
    }

    #[test]
    fn init_env_follows_the_seed_in_the_setup_data_list() {
        let mem = crate::vmm::memory::create_guest_memory(16).unwrap();
        let cmdline = Cmdline::new(64).unwrap();
        let env = vec!["GLIBC_TUNABLES=a=b".to_string(), "X=1".to_string()];
        write_boot_params(&mem, &cmdline, &env, None).unwrap();
        let word = |at: u64| -> u64 { mem.read_obj(GuestAddress(at)).unwrap() };
        let next = word(SETUP_DATA_START);
        assert_eq!(next % 8, 0);
        assert!(next >= SETUP_DATA_START + 16 + RNG_SEED_LEN as u64);
        assert_eq!(word(next), 0, "the environment is the last node");
        let kind_len = word(next + 8);
        assert_eq!(kind_len as u32, u32::from_le_bytes(*b"Husk"));
        let len = (kind_len >> 32) as usize;
        let mut data = vec![0u8; len];
        mem.read_slice(&mut data, GuestAddress(next + 16)).unwrap();
        assert_eq!(data, b"GLIBC_TUNABLES=a=b\0X=1");
        // Below the kernel and out of the RAM map, as the seed.
        assert!(next + 16 + INIT_ENV_MAX as u64 <= HIMEM_START);
        // More than the kernel keeps is an error naming the fix, not a cut variable.
        let long = vec![format!("A={}", "x".repeat(INIT_ENV_MAX))];
        let err = write_boot_params(&mem, &cmdline, &long, None).unwrap_err();
        assert!(err.to_string().contains("cmdline.pvm"), "{err}");
    }

    #[test]
    fn boot_params_point_at_cmdline_initrd_and_carry_the_magic() {
        let p = build_boot_params(128 << 20, 42, Some((0x700_0000, 0x1234)), None);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x700_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 2);
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram() {
        assert_eq!(
            initrd_address(128 << 20, 0x200_0000, 0x1800),
            Some((128 << 20) - 0x2000)
        );
        assert_eq!(initrd_address(32 << 20, 0x1f0_0000, 0x20_0000), None);
        assert_eq!(initrd_address(1 << 20, 0, 2 << 20), None);
    }

    #[test]
    fn non_elf_kernel_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("bzImage");
        std::fs::write(&bogus, vec![0x4d_u8; 4096]).unwrap();
        let mem = crate::vmm::memory::create_guest_memory(16).unwrap();
        let err = load_kernel(&mem, &bogus).unwrap_err().to_string();
        assert!(
            err.contains("not a loadable ELF vmlinux") && err.contains("bzImage"),
            "{err}"
        );
        let err = load_kernel(&mem, &dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kernel"), "{err}");
    }

    #[test]
    fn elf_kernel_beyond_guest_memory_asks_for_more_memory() {
        // A minimal ELF64 header with one PT_LOAD segment at 64 MiB: past 16 MiB of RAM.
        let mut elf = vec![0u8; 0x1000];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&0x400_0000u64.to_le_bytes()); // entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers right after
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut elf[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x200u64.to_le_bytes()); // file offset
        ph[24..32].copy_from_slice(&0x400_0000u64.to_le_bytes()); // physical address
        ph[32..40].copy_from_slice(&0x100u64.to_le_bytes()); // file size
        ph[40..48].copy_from_slice(&0x100u64.to_le_bytes()); // memory size
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, &elf).unwrap();
        let mem = crate::vmm::memory::create_guest_memory(16).unwrap();
        let err = load_kernel(&mem, &path).unwrap_err().to_string();
        assert!(
            err.contains("does not fit in 16 MiB") && err.contains("--mem-mib"),
            "{err}"
        );
    }
}
