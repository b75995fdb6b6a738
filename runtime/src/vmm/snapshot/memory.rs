//! Guest RAM in the snapshot file: written sparsely, mapped back copy-on-write.
//!
//! RAM regions are stored back to back from a page-aligned offset, in guest address
//! order (the same layout as the memfd of [`crate::vmm::memory`]). Pages that are all
//! zeros are not written: the file keeps a hole there, which reads back as zeros and
//! takes no disk space. A restore maps the file `MAP_PRIVATE`: pages are read from the
//! page cache only when the guest touches them, shared by every VM restored from the same
//! file, and copied only when a VM writes them.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::SnapshotError;
use crate::vmm::memory::ram_ranges;

/// The unit of the zero-page check and of file alignment.
pub const PAGE_SIZE: u64 = 4096;
/// Memory is copied out in chunks of this size.
const CHUNK: usize = 2 << 20;

/// Writes every non-zero page of `mem` into `file` at `offset` (page aligned), and sizes
/// the file so the zero pages are holes. Returns the bytes of RAM stored (holes included).
pub fn write_sparse(file: &File, offset: u64, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Write {
        what: "guest memory",
        source,
    };
    let mut pos = offset;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], region.start_addr().unchecked_add(done))
                .map_err(|e| SnapshotError::Write {
                    what: "guest memory",
                    source: std::io::Error::other(e.to_string()),
                })?;
            write_nonzero_pages(file, pos + done, &buf[..n]).map_err(io)?;
            done += n as u64;
        }
        pos += len;
    }
    file.set_len(pos).map_err(io)?;
    Ok(pos - offset)
}

/// Writes the runs of non-zero pages of `data` at `at`.
fn write_nonzero_pages(file: &File, at: u64, data: &[u8]) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut run_start = None;
    for (i, chunk) in data.chunks(page).enumerate() {
        let zero = chunk.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * page),
            (true, Some(start)) => {
                file.write_all_at(&data[start..i * page], at + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], at + start as u64)?;
    }
    Ok(())
}

/// Maps `mem_size` bytes of guest RAM from `file` at `offset`, private and lazily loaded.
pub fn map_private(
    file: &File,
    offset: u64,
    mem_size: u64,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut file_offset = offset;
    let mut regions = Vec::new();
    for range in ram_ranges(mem_size) {
        let fo = FileOffset::new(
            file.try_clone()
                .map_err(|source| SnapshotError::MapMemory(source.to_string()))?,
            file_offset,
        );
        let size = usize::try_from(range.size)
            .map_err(|_| SnapshotError::MapMemory(format!("{} bytes do not fit", range.size)))?;
        // MAP_NORESERVE: a private mapping would otherwise reserve swap for every page it
        // might copy, which is the whole guest per VM.
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::MapMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(range.start)).ok_or_else(|| {
            SnapshotError::MapMemory("region overflows the guest address space".into())
        })?;
        regions.push(region);
        file_offset += range.size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::MapMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::vmm::memory::create_guest_memory;

    #[test]
    fn zero_pages_become_holes_and_private_maps_do_not_share_writes() {
        let mem = create_guest_memory(16).unwrap();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress((16 << 20) - 1))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(write_sparse(&file, PAGE_SIZE, &mem).unwrap(), 16 << 20);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), PAGE_SIZE + (16 << 20));
        assert!(
            meta.blocks() * 512 <= 4 * PAGE_SIZE,
            "{} blocks: zero pages were written",
            meta.blocks()
        );

        let a = map_private(&file, PAGE_SIZE, 16 << 20).unwrap();
        let b = map_private(&file, PAGE_SIZE, 16 << 20).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            b.read_obj::<u8>(GuestAddress((16 << 20) - 1)).unwrap(),
            0x55
        );
        a.write_obj(0xaaaa_u32, GuestAddress(0x5000)).unwrap();
        b.write_obj(0xbbbb_u32, GuestAddress(0x5000)).unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xaaaa);
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xbbbb);
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, PAGE_SIZE + 0x5000)
            .unwrap();
        assert_eq!(
            u32::from_le_bytes(on_disk),
            0x1122_3344,
            "the file must stay untouched"
        );
    }
}
