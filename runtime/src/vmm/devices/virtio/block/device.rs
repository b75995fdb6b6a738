//! The virtio-blk device (virtio 1.2, 5.2): one request queue over a read-only file.
//! Reads go from the file straight into the guest's buffers; writes are refused, since
//! one image is shared by every sandbox (and by templates made from it).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::SECTOR_SIZE;
use crate::vmm::devices::virtio::{
    device_type, features, read_config_space, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
};

/// The only queue (5.2.2).
pub const REQUESTQ: usize = 0;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data segments per request the driver may use: a chain also holds the header and the
/// status byte. Without `SEG_MAX` Linux sends one segment per request, so a 128 KiB
/// readahead of scattered page-cache pages becomes 32 requests, each costing emulated
/// guest-kernel time on PVM hosts.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data length of one request served. Linux's default limit is far below it
/// (1280 KiB); it bounds the device's buffer against a hostile driver.
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// `struct virtio_blk_config` up to `seg_max`: capacity (le64), size_max, seg_max (le32).
const CONFIG_LEN: usize = 16;
/// Length of the answer to `GET_ID` (`VIRTIO_BLK_ID_BYTES`).
const ID_BYTES: usize = 20;

/// Feature bits (5.2.3).
pub mod offered {
    use virtio_bindings::virtio_blk as vb;

    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// Device features besides VERSION_1.
    pub const OFFERED: u64 = SEG_MAX | RO;
}

/// Request types and status values (5.2.6).
mod request {
    use virtio_bindings::virtio_blk as vb;

    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
    pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
    pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
    /// `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
    pub const HEADER_LEN: usize = 16;
}

/// Errors of the block device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BlockError {
    /// cannot open the disk image {path}: {source}
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// the disk image {path} is empty; build it again (husk-rootfs root-disk)
    Empty { path: PathBuf },
    /// cannot create or read the queue eventfd: {0}
    EventFd(#[source] io::Error),
    /// cannot raise the interrupt: {0}
    Interrupt(#[source] io::Error),
}

/// Request counters, for `husk inspect` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub read_requests: u64,
    pub read_bytes: u64,
    /// Requests answered with an error status (out of range, writes, unknown types).
    pub failed_requests: u64,
}

/// The virtio-blk device.
pub struct Block {
    disk: File,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    queue_events: Vec<EventFd>,
    /// Reused between requests: data read from the file on its way to the guest.
    buffer: Vec<u8>,
    stats: BlockStats,
    active: Option<ActiveQueues>,
}

impl Block {
    /// A read-only disk over the image at `path`. Its capacity is the file's size in
    /// whole sectors; the serial (`GET_ID`) is `id`, cut to 20 bytes.
    pub fn open(path: &Path, id: &str) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let disk = File::open(path).map_err(open_err)?;
        let len = disk.metadata().map_err(open_err)?.len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Empty {
                path: path.to_path_buf(),
            });
        }
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        let queue_events = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(BlockError::EventFd)?;
        Ok(Self {
            disk,
            capacity_sectors,
            id: serial,
            queue_events,
            buffer: Vec::new(),
            stats: BlockStats::default(),
            active: None,
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Serves every request in the queue, in order, then raises one interrupt.
    pub(super) fn process_queue(&mut self) -> Result<(), BlockError> {
        let Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        }) = self.active.as_mut()
        else {
            return Ok(());
        };
        let queue = &mut queues[REQUESTQ];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let served = serve(
                &self.disk,
                self.capacity_sectors,
                &self.id,
                &mut self.buffer,
                mem,
                chain,
            );
            let written = match served {
                Ok(Served { status, written }) => {
                    if status == request::S_OK {
                        if written.is_read {
                            self.stats.read_requests += 1;
                            self.stats.read_bytes += written.data as u64;
                        }
                    } else {
                        self.stats.failed_requests += 1;
                    }
                    written.data + 1
                }
                Err(e) => {
                    // No status byte to report through: return the chain empty.
                    warn!("virtio-blk: bad request chain: {e}");
                    self.stats.failed_requests += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(&*mem, head, written as u32) {
                warn!("virtio-blk: cannot return a request: {e}");
            }
            used_any = true;
        }
        if used_any {
            interrupt
                .signal_used_buffer()
                .map_err(BlockError::Interrupt)?;
        }
        Ok(())
    }
}

/// Bytes a request put in the guest's data buffers.
struct Written {
    data: usize,
    is_read: bool,
}

struct Served {
    status: u8,
    written: Written,
}

/// A chain that does not have the shape of a request (5.2.6): no header, no status byte,
/// or buffers outside guest memory.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum ChainError {
    /// {0}
    Queue(#[from] virtio_queue::Error),
    /// splitting the device-writable buffers: {0}
    Split(String),
    /// the header is shorter than 16 bytes: {0}
    Header(#[source] io::Error),
    /// no device-writable byte for the status
    NoStatus,
    /// writing to the guest: {0}
    Write(#[source] io::Error),
}

/// Serves one request: reads the header, fills the data buffers, writes the status.
fn serve<M>(
    disk: &File,
    capacity_sectors: u64,
    id: &[u8; ID_BYTES],
    buffer: &mut Vec<u8>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<Served, ChainError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut header = [0u8; request::HEADER_LEN];
    chain
        .clone()
        .reader(mem)?
        .read_exact(&mut header)
        .map_err(ChainError::Header)?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let mut data = chain.writer(mem)?;
    let data_len = data
        .available_bytes()
        .checked_sub(1)
        .ok_or(ChainError::NoStatus)?;
    let mut status_writer = data
        .split_at(data_len)
        .map_err(|e| ChainError::Split(format!("{e:?}")))?;
    let (status, is_read) = match kind {
        request::IN => {
            let status = match read_range(sector, data_len, capacity_sectors) {
                Some(offset) => {
                    buffer.resize(data_len, 0);
                    match disk.read_exact_at(&mut buffer[..data_len], offset) {
                        Ok(()) => {
                            data.write_all(&buffer[..data_len])
                                .map_err(ChainError::Write)?;
                            request::S_OK
                        }
                        Err(e) => {
                            warn!("virtio-blk: reading {data_len} bytes at {offset}: {e}");
                            request::S_IOERR
                        }
                    }
                }
                None => request::S_IOERR,
            };
            (status, true)
        }
        request::GET_ID => {
            // The serial fills the buffer, NUL-padded when the buffer is longer.
            let n = data_len.min(ID_BYTES);
            data.write_all(&id[..n]).map_err(ChainError::Write)?;
            (request::S_OK, false)
        }
        // Nothing is ever written, so there is nothing to flush.
        request::FLUSH => (request::S_OK, false),
        request::OUT => (request::S_IOERR, false),
        _ => (request::S_UNSUPP, false),
    };
    status_writer
        .write_all(&[status])
        .map_err(ChainError::Write)?;
    Ok(Served {
        status,
        written: Written {
            data: data.bytes_written(),
            is_read,
        },
    })
}

/// The byte offset of a read of `len` bytes at `sector`, if it is whole sectors within
/// the disk and not over the request limit.
fn read_range(sector: u64, len: usize, capacity_sectors: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_REQUEST_BYTES {
        return None;
    }
    let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
    if end > capacity_sectors {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | offered::OFFERED
    }

    /// Nothing here depends on what the driver accepted: RO and SEG_MAX only describe
    /// the device.
    fn ack_features(&mut self, _features: u64) {}

    /// `struct virtio_blk_config` up to `seg_max`; read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, with CONFIG_WCE, which we do not offer.
        warn!("virtio-blk: guest write to read-only config at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActiveQueues::activate(&mut self.active, QUEUE_SIZES.len(), mem, interrupt, queues)
    }

    fn reset(&mut self) {
        self.active = None;
    }
}
