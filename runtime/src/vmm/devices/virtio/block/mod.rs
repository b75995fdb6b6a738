//! virtio-blk (virtio 1.2, 5.2), read-only, over a host file: the guest's root disk.
//!
//! Why a disk and not only an initramfs: the guest kernel copies every byte of an
//! initramfs into its page cache, and on PVM hosts that copy runs in emulated kernel code
//! (~3.5 s per MB). From a disk the guest reads only the pages it touches, and the bytes
//! are written into guest memory by this device, natively (docs/design.md, "Guest root").
//!
//! - [`device`]: config space, features, and requests from the queue to the file.
//! - [`event_handler`]: what the VMM event loop polls and calls.

pub mod device;
pub mod event_handler;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockError, BlockStats};
pub use event_handler::BlockEvent;

/// Bytes per sector: virtio-blk addresses the disk in 512-byte units whatever the
/// block size of the file system on it (5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Leading bytes of an ext2/3/4 superblock's magic: the file is a disk image, not an
/// initramfs (the superblock starts at byte 1024, its magic at offset 56 of it).
const EXT_MAGIC_OFFSET: u64 = 1024 + 56;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

/// Whether `file` holds an ext2/3/4 file system (a root disk image) rather than, say,
/// a cpio initramfs.
pub fn is_ext_image(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    match file.read_exact_at(&mut magic, EXT_MAGIC_OFFSET) {
        Ok(()) => Ok(magic == EXT_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}
