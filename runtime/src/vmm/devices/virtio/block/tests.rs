//! The block device against in-memory guest memory and a temporary disk file, driven
//! through its queue as the guest's driver would.

use std::io::Write;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{offered, REQUESTQ};
use super::*;
use crate::vmm::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::vmm::devices::virtio::{device_type, features, Interrupt, VirtioDevice};

const QUEUE_BASE: u64 = 0x1_0000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x3_0000;
const STATUS: u64 = 0x5_0000;
/// Disk of 16 sectors; sector n holds the byte n + 1 everywhere.
const SECTORS: u64 = 16;

struct Fixture {
    mem: GuestMemoryMmap,
    driver: DriverQueue,
    block: Block,
    irq: Arc<Interrupt>,
    _disk: tempfile::NamedTempFile,
}

fn disk() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for sector in 0..SECTORS {
        file.write_all(&[sector as u8 + 1; SECTOR_SIZE as usize])
            .unwrap();
    }
    // A partial sector at the end is not part of the disk.
    file.write_all(&[0xee; 100]).unwrap();
    file
}

fn fixture() -> Fixture {
    let mem = guest_memory(1 << 20);
    let file = disk();
    let mut block = Block::open(file.path(), "husk-root").unwrap();
    let driver = DriverQueue::new(&mem, GuestAddress(QUEUE_BASE), 16);
    let irq = Arc::new(Interrupt::new().unwrap());
    block.ack_features(block.avail_features());
    block
        .activate(mem.clone(), irq.clone(), vec![driver.device_queue()])
        .unwrap();
    Fixture {
        mem,
        driver,
        block,
        irq,
        _disk: file,
    }
}

impl Fixture {
    /// Publishes a request: header, then `data` (device-writable buffers of these lengths
    /// from DATA on, 4 KiB apart), then a status byte. Returns nothing: see `finish`.
    fn request(&mut self, kind: u32, sector: u64, data: &[u32]) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![Buf {
            addr: GuestAddress(HEADER),
            len: 16,
            device_writes: false,
        }];
        for (i, &len) in data.iter().enumerate() {
            bufs.push(Buf {
                addr: GuestAddress(DATA + 0x1000 * i as u64),
                len,
                device_writes: true,
            });
        }
        bufs.push(Buf {
            addr: GuestAddress(STATUS),
            len: 1,
            device_writes: true,
        });
        self.driver.add_chain(&bufs).unwrap();
    }

    /// Lets the device run; the (bytes written, status) of the one used request.
    fn finish(&mut self) -> (u32, u8) {
        self.block.queue_events()[REQUESTQ].write(1).unwrap();
        self.block.process(BlockEvent::Queue).unwrap();
        let (_, len) = self.driver.pop_used().expect("request returned");
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn data(&self, at: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(DATA + at))
            .unwrap();
        out
    }
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

#[test]
fn offers_a_read_only_disk_of_whole_sectors() {
    let f = fixture();
    assert_eq!(f.block.device_type(), device_type::BLOCK);
    assert_eq!(
        f.block.avail_features(),
        features::VERSION_1 | offered::RO | offered::SEG_MAX
    );
    assert_eq!(
        f.block.capacity_sectors(),
        SECTORS,
        "the partial sector is cut"
    );
    let mut config = [0u8; 16];
    f.block.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), SECTORS);
    assert_eq!(u32::from_le_bytes(config[12..].try_into().unwrap()), 254);
    assert_eq!(f.block.queue_max_sizes(), &[256]);
}

#[test]
fn reads_land_in_the_guest_buffers_across_segments() {
    let mut f = fixture();
    // Sectors 3..6 into a 512-byte and a 1024-byte buffer.
    f.request(T_IN, 3, &[512, 1024]);
    assert_eq!(f.finish(), (1536 + 1, 0));
    assert_eq!(f.data(0, 512), vec![4u8; 512]);
    assert_eq!(f.data(0x1000, 512), vec![5u8; 512]);
    assert_eq!(f.data(0x1000 + 512, 512), vec![6u8; 512]);
    assert_ne!(f.irq.status(), 0, "used-buffer interrupt raised");
    let stats = f.block.stats();
    assert_eq!((stats.read_requests, stats.read_bytes), (1, 1536));
}

#[test]
fn reads_past_the_end_or_of_partial_sectors_fail_and_write_nothing() {
    let mut f = fixture();
    for (sector, len) in [
        (SECTORS - 1, 1024),
        (SECTORS, 512),
        (0, 100),
        (u64::MAX, 512),
    ] {
        f.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        f.request(T_IN, sector, &[len]);
        assert_eq!(f.finish(), (1, 1), "sector {sector} len {len}: IOERR");
        assert_eq!(f.data(0, 1024), vec![0u8; 1024], "nothing written");
    }
    assert_eq!(f.block.stats().failed_requests, 4);
    // The device goes on serving after errors.
    f.request(T_IN, SECTORS - 1, &[512]);
    assert_eq!(f.finish(), (513, 0));
    assert_eq!(f.data(0, 512), vec![SECTORS as u8; 512]);
}

#[test]
fn writes_fail_flush_succeeds_unknown_types_are_unsupported() {
    let mut f = fixture();
    f.request(T_OUT, 0, &[]);
    assert_eq!(f.finish(), (1, 1), "a write to the read-only disk: IOERR");
    f.request(T_FLUSH, 0, &[]);
    assert_eq!(f.finish(), (1, 0));
    f.request(T_DISCARD, 0, &[]);
    assert_eq!(f.finish(), (1, 2), "UNSUPP");
}

#[test]
fn get_id_answers_the_serial_nul_padded() {
    let mut f = fixture();
    f.mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    f.request(T_GET_ID, 0, &[20]);
    assert_eq!(f.finish(), (21, 0));
    let mut want = b"husk-root".to_vec();
    want.resize(20, 0);
    assert_eq!(f.data(0, 20), want);
}

#[test]
fn a_chain_without_a_status_byte_is_returned_empty() {
    let mut f = fixture();
    let header = Buf {
        addr: GuestAddress(HEADER),
        len: 16,
        device_writes: false,
    };
    f.driver.add_chain(&[header]).unwrap();
    f.block.process(BlockEvent::Queue).unwrap();
    assert_eq!(f.driver.pop_used().map(|(_, len)| len), Some(0));
    assert_eq!(f.block.stats().failed_requests, 1);
}

#[test]
fn opening_names_the_image_and_refuses_an_empty_one() {
    let err = Block::open(std::path::Path::new("/nonexistent/root.img"), "x")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/root.img"), "{err}");
    let empty = tempfile::NamedTempFile::new().unwrap();
    let err = Block::open(empty.path(), "x").err().unwrap().to_string();
    assert!(err.contains("empty") && err.contains("root-disk"), "{err}");
}

#[test]
fn ext_images_are_told_from_other_files() {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image.write_all(&[0u8; 1080]).unwrap();
    image.write_all(&[0x53, 0xef]).unwrap();
    image.write_all(&[0u8; 100]).unwrap();
    assert!(is_ext_image(image.as_file()).unwrap());
    let mut cpio = tempfile::NamedTempFile::new().unwrap();
    cpio.write_all(b"070701").unwrap();
    cpio.write_all(&[b'0'; 4000]).unwrap();
    assert!(!is_ext_image(cpio.as_file()).unwrap());
    let short = tempfile::NamedTempFile::new().unwrap();
    assert!(!is_ext_image(short.as_file()).unwrap());
}
