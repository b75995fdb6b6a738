//! Guest physical memory: where things live, and the memfd that backs it.
//!
//! RAM is one memfd mapped `MAP_SHARED`, so that a vhost-user backend (virtiofsd) can map
//! the same pages later. Below 4 GiB a hole is left for MMIO devices, the IOAPIC/LAPIC and
//! KVM's TSS; RAM that does not fit under the hole continues at 4 GiB.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Boot GDT (the long-mode code, data and TSS descriptors the vCPU starts with).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: empty, so any early exception shuts the guest down instead of looping.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, then PDPT, then one page directory of 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line (the x86 boot protocol's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable, the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// The `setup_data` list the zero page points at (the RNG seed): in the legacy video
/// hole, above the MP table and outside the e820 RAM map. In RAM it would split the map's
/// first entry (the kernel marks setup_data reserved), and each of the ~8000 e820 lookups
/// of the kernel's early page table setup would walk twice the entries: ~0.2 M emulated
/// instructions on PVM hosts.
pub const SETUP_DATA_START: u64 = 0xa_0000;
/// First byte above the legacy ISA hole; the kernel loads at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB: virtio-mmio devices first, IOAPIC/LAPIC and KVM's pages last.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// virtio-mmio devices start at the bottom of the hole, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_HOLE_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM needs three pages for the real-mode TSS and one for the identity map (Intel
/// only, but harmless elsewhere); they sit in the hole where no RAM can collide.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The IOAPIC and local APIC, where the MP table says they are.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Smallest guest accepted: the boot structures, the kernel at 1 MiB and a little RAM.
pub const MIN_MEM_MIB: u64 = 16;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryError {
    /// guest memory of {0} MiB is too small: at least 16 MiB is needed (raise --mem-mib)
    TooSmall(u64),
    /// guest memory of {0} MiB is larger than this host can address; lower --mem-mib
    TooLarge(u64),
    /// creating the guest memory file (memfd) failed: {0}
    Memfd(std::io::Error),
    /// sizing the guest memory file to {size} bytes failed: {source}
    SetLen { size: u64, source: std::io::Error },
    /// mapping guest memory failed: {0}
    Map(vm_memory::mmap::FromRangesError),
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where `mem_size` bytes of RAM go: below the MMIO hole, then from 4 GiB up.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if mem_size > low {
        ranges.push(RamRange {
            start: MMIO_HOLE_END,
            size: mem_size - low,
        });
    }
    ranges
}

/// End of the RAM below the MMIO hole (where the initrd is placed under).
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// Creates guest RAM of `mem_mib` MiB, backed by one shared memfd.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    let size = mem_mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::TooLarge(mem_mib))?;
    if usize::try_from(size).is_err() {
        return Err(MemoryError::TooLarge(mem_mib));
    }
    let file = memfd(c"husk-guest-ram")?;
    file.set_len(size)
        .map_err(|source| MemoryError::SetLen { size, source })?;
    let mut file_offset = 0u64;
    let regions: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|r| {
            let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset);
            file_offset += r.size;
            Ok((GuestAddress(r.start), r.size as usize, Some(fo)))
        })
        .collect::<Result<_, MemoryError>>()?;
    // With a file offset vm-memory maps the file MAP_SHARED, which is what a vhost-user
    // backend needs to see the same pages.
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

fn memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn small_guest_is_one_range_below_the_hole() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                size: 128 << 20
            }]
        );
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges[0],
            RamRange {
                start: 0,
                size: MMIO_HOLE_START
            }
        );
        assert_eq!(ranges[1].start, 1 << 32);
        assert_eq!(ranges[1].size, (4 << 30) - MMIO_HOLE_START);
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn boot_structures_do_not_overlap_and_sit_in_low_ram() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
        for addr in [
            KVM_TSS_ADDRESS,
            KVM_IDENTITY_MAP_ADDRESS,
            IOAPIC_START,
            APIC_START,
        ] {
            assert!((MMIO_HOLE_START..MMIO_HOLE_END).contains(&addr));
        }
    }

    #[test]
    fn memory_is_a_shared_memfd_mapping() {
        let mem = create_guest_memory(MIN_MEM_MIB).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let fo = region.file_offset().expect("guest RAM must be file backed");
        let mut buf = [0u8; 4];
        fo.file().read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(mem.last_addr(), GuestAddress((MIN_MEM_MIB << 20) - 1));
    }

    #[test]
    fn too_little_memory_is_a_clear_error() {
        let err = create_guest_memory(4).unwrap_err().to_string();
        assert!(err.contains("4 MiB") && err.contains("--mem-mib"), "{err}");
    }
}
