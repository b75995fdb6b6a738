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

/// Guest RAM in a fresh shared memfd with the snapshot's pages copied in (eagerly, data
/// only: SEEK_DATA skips the holes). For VMs with a vhost-user device (virtio-fs): its
/// backend maps guest RAM from the memfd and must see the guest's writes, which a private
/// file mapping keeps to itself.
pub fn copy_to_memfd(
    file: &File,
    offset: u64,
    mem_size: u64,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let mem = crate::vmm::memory::create_guest_memory(mem_size >> 20)
        .map_err(|e| SnapshotError::MapMemory(e.to_string()))?;
    let read_err = |e: std::io::Error| SnapshotError::MapMemory(format!("reading RAM: {e}"));
    let end = offset + mem_size;
    let mut pos = offset;
    let mut buf = vec![0u8; CHUNK];
    while pos < end {
        let Some(data) = seek(file, pos, libc::SEEK_DATA).map_err(read_err)? else {
            break; // only holes left
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)
            .map_err(read_err)?
            .unwrap_or(end)
            .min(end);
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(read_err)?;
            write_linear(&mem, at - offset, &buf[..n])?;
            at += n as u64;
        }
        pos = hole;
    }
    Ok(mem)
}

/// `lseek(fd, from, whence)`; `None` when there is no more data (ENXIO).
fn seek(file: &File, from: u64, whence: i32) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let from = i64::try_from(from).map_err(std::io::Error::other)?;
    // SAFETY: lseek on an open fd this function borrows; the result is checked.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Writes `data` at byte `linear` of guest RAM counted across the regions in order.
fn write_linear(mem: &GuestMemoryMmap, linear: u64, data: &[u8]) -> Result<(), SnapshotError> {
    let mut base = 0u64;
    let mut rest = data;
    let mut at = linear;
    for region in mem.iter() {
        let len = region.len();
        if at < base + len && !rest.is_empty() {
            let n = rest.len().min((base + len - at) as usize);
            mem.write_slice(&rest[..n], region.start_addr().unchecked_add(at - base))
                .map_err(|e| SnapshotError::MapMemory(format!("copying RAM: {e}")))?;
            rest = &rest[n..];
            at += n as u64;
        }
        base += len;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::MapMemory(
            "snapshot RAM beyond the guest's memory".into(),
        ))
    }
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
        let copied = copy_to_memfd(&file, PAGE_SIZE, 16 << 20).unwrap();
        assert_eq!(
            copied.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            copied.read_obj::<u8>(GuestAddress((16 << 20) - 1)).unwrap(),
            0x55
        );
        assert_eq!(copied.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0);
        let region = copied.find_region(GuestAddress(0)).unwrap();
        assert!(region.file_offset().is_some(), "a memfd a backend can map");
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
