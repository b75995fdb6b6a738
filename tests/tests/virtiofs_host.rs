//! virtio-fs with a real virtiofsd, no guest kernel: the test plays the guest driver on
//! the MMIO transport (negotiation, queues, DRIVER_OK), puts FUSE requests in guest
//! memory, kicks, relays virtiofsd's call like the VMM event loop, and reads the replies.
//!
//! Needs root (virtiofsd's namespace sandbox) and virtiofsd from `scripts/setup.sh`
//! (`target/husk/virtiofsd`) or `HUSK_VIRTIOFSD`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk::artifacts::{self, Artifact};
use husk::vmm::devices::virtio::fs::{self, FsConfig, FsDevice, FsEvent, VirtiofsdConfig};
use husk::vmm::devices::BusDevice;
use husk::vmm::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// virtio-mmio registers (virtio 1.2, 4.2.2).
const MAGIC: u64 = 0x00;
const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC: u64 = 0x80;
const QUEUE_AVAIL: u64 = 0x90;
const QUEUE_USED: u64 = 0xa0;
const CONFIG: u64 = 0x100;
const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const VERSION_1: u64 = 1 << 32;
const INT_USED_BUFFER: u32 = 1;

// FUSE (include/uapi/linux/fuse.h).
const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;

const REQUEST_QUEUE: u16 = 1;
const QUEUE_SIZE: u16 = 16;
const CONTENT: &[u8] = b"hello from the host share\n";

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "virtiofs tests need root: virtiofsd's --sandbox namespace creates namespaces; run them as root"
    );
}

fn virtiofsd_binary() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/husk/virtiofsd");
    let explicit = std::env::var_os("HUSK_VIRTIOFSD").is_none() && built.exists();
    artifacts::locate(Artifact::Virtiofsd, explicit.then_some(built.as_path()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A share with one file, a socket directory, and the config for them.
struct Setup {
    share: tempfile::TempDir,
    run: tempfile::TempDir,
    config: FsConfig,
}

fn setup() -> Setup {
    require_root();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("hello.txt"), CONTENT).unwrap();
    let run = tempfile::tempdir().unwrap();
    let vfsd = VirtiofsdConfig::new(
        virtiofsd_binary(),
        share.path().to_path_buf(),
        run.path().join("fs.sock"),
    );
    Setup {
        share,
        run,
        config: FsConfig::new("rootfs", vfsd),
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn wait_dead(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    !alive(pid)
}

/// The guest driver's view of the transport.
struct Driver<'a> {
    fs: &'a FsDevice,
    mem: GuestMemoryMmap,
}

impl Driver<'_> {
    fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.fs.transport.lock().unwrap().read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        self.fs
            .transport
            .lock()
            .unwrap()
            .write(offset, &value.to_le_bytes());
    }

    fn write64(&self, offset: u64, value: u64) {
        self.write(offset, value as u32);
        self.write(offset + 4, (value >> 32) as u32);
    }

    /// Virtio initialization up to FEATURES_OK (3.1.1); returns the device's features.
    fn negotiate(&self) -> u64 {
        assert_eq!(self.read(MAGIC), 0x7472_6976);
        assert_eq!(self.read(DEVICE_ID), 26, "virtio-fs is device type 26");
        self.write(STATUS, S_ACK);
        self.write(STATUS, S_ACK | S_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let offered = u64::from(lo) | (u64::from(self.read(DEVICE_FEATURES)) << 32);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, 0);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (VERSION_1 >> 32) as u32);
        self.write(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_ne!(self.read(STATUS) & S_FEATURES_OK, 0, "FEATURES_OK refused");
        offered
    }

    /// Sets up queue `index` at `base` and returns the driver's handle on it.
    fn setup_queue(&self, index: u16, base: u64) -> Ring {
        self.write(QUEUE_SEL, u32::from(index));
        assert!(self.read(QUEUE_NUM_MAX) >= u32::from(QUEUE_SIZE));
        self.write(QUEUE_NUM, u32::from(QUEUE_SIZE));
        let ring = Ring::new(&self.mem, base);
        self.write64(QUEUE_DESC, ring.desc);
        self.write64(QUEUE_AVAIL, ring.avail);
        self.write64(QUEUE_USED, ring.used);
        self.write(QUEUE_READY, 1);
        ring
    }

    fn driver_ok(&self) {
        self.write(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }
}

/// A split virtqueue of QUEUE_SIZE entries laid out from `base`.
struct Ring {
    mem: GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &GuestMemoryMmap, base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(QUEUE_SIZE);
        let used = (avail + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3;
        for addr in [avail, avail + 2, used, used + 2] {
            mem.write_obj(0u16, GuestAddress(addr)).unwrap();
        }
        Self {
            mem: mem.clone(),
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Publishes a chain: `request` (device-readable) at `buf`, then `reply_len`
    /// device-writable bytes at `buf + 0x1000`. Descriptors 0 and 1 are reused: one
    /// request is in flight at a time.
    fn publish(&mut self, buf: u64, request: &[u8], reply_len: u32) {
        self.mem.write_slice(request, GuestAddress(buf)).unwrap();
        let reply = buf + 0x1000;
        let write_desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = self.desc + 16 * i;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        };
        write_desc(0, buf, request.len() as u32, 1, 1); // NEXT
        write_desc(1, reply, reply_len, 2, 0); // WRITE
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The next used entry: (head, bytes written).
    fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        ))
    }
}

/// Polls the device's event sources like the VMM event loop and runs `process`; returns
/// the events seen until `until` says stop.
fn event_loop(fs: &FsDevice, mut until: impl FnMut(FsEvent) -> bool) -> Vec<FsEvent> {
    let sources = fs.device.lock().unwrap().event_sources();
    let mut fds: Vec<libc::pollfd> = sources
        .iter()
        .map(|(fd, _)| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        for (pfd, (_, event)) in fds.iter_mut().zip(&sources) {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            pfd.revents = 0;
            let result = fs.device.lock().unwrap().process(*event);
            if let Err(e) = result {
                panic!("device event {event:?} failed: {e}");
            }
            seen.push(*event);
            if until(*event) {
                return seen;
            }
        }
    }
    panic!("no expected event from virtiofsd within 10 s (saw {seen:?})");
}

fn in_header(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(IN_HEADER_LEN + body.len());
    h.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // uid
    h.extend_from_slice(&0u32.to_le_bytes()); // gid
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&[0u8; 4]); // total_extlen, padding
    h.extend_from_slice(body);
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// An activated device with its request queue, as a guest driver leaves it after probe.
struct Guest<'a> {
    driver: Driver<'a>,
    queue: Ring,
    unique: u64,
}

fn activate<'a>(fs: &'a FsDevice, mem: &GuestMemoryMmap) -> Guest<'a> {
    let driver = Driver {
        fs,
        mem: mem.clone(),
    };
    let offered = driver.negotiate();
    assert_ne!(offered & VERSION_1, 0);
    assert_eq!(
        offered & (1 << 30),
        0,
        "the vhost-user bit must not reach the guest"
    );
    // Config space: the tag, NUL-padded to 36 bytes, then num_request_queues.
    let mut tag = [0u8; 36];
    for (i, chunk) in tag.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&driver.read(CONFIG + 4 * i as u64).to_le_bytes());
    }
    assert_eq!(&tag[..7], b"rootfs\0");
    assert!(tag[7..].iter().all(|&b| b == 0));
    assert_eq!(driver.read(CONFIG + 36), 1, "num_request_queues");
    driver.setup_queue(0, 0x10_0000);
    let queue = driver.setup_queue(REQUEST_QUEUE, 0x20_0000);
    driver.driver_ok();
    let status = driver.read(STATUS);
    assert_eq!(
        status & (S_DRIVER_OK | S_NEEDS_RESET),
        S_DRIVER_OK,
        "activation failed (status {status:#x})"
    );
    Guest {
        driver,
        queue,
        unique: 0,
    }
}

impl Guest<'_> {
    /// Sends one FUSE request on the request queue and returns the reply (header
    /// included), after checking the interrupt path as the guest's handler would.
    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (u64, Vec<u8>) {
        self.unique += 2;
        let unique = self.unique;
        let req = in_header(opcode, unique, nodeid, body);
        self.queue.publish(0x30_0000, &req, 0x1000);
        self.driver.write(QUEUE_NOTIFY, u32::from(REQUEST_QUEUE));
        event_loop(self.driver.fs, |e| {
            e == FsEvent::Used(REQUEST_QUEUE as usize)
        });
        // Any duplicate of the irqfd reads the same counter.
        let irq = self.driver.fs.irq_evt().unwrap().read();
        assert!(
            irq.is_ok_and(|n| n >= 1),
            "the interrupt eventfd was not signalled"
        );
        let isr = self.driver.read(INTERRUPT_STATUS);
        assert_eq!(
            isr & INT_USED_BUFFER,
            INT_USED_BUFFER,
            "InterruptStatus {isr:#x}"
        );
        self.driver.write(INTERRUPT_ACK, isr);
        assert_eq!(self.driver.read(INTERRUPT_STATUS), 0);
        let (head, len) = self.queue.pop_used().expect("no used entry after the call");
        assert_eq!(head, 0);
        let mut reply = vec![0u8; len as usize];
        self.driver
            .mem
            .read_slice(&mut reply, GuestAddress(0x30_1000))
            .unwrap();
        assert!(reply.len() >= OUT_HEADER_LEN, "short reply: {reply:?}");
        assert_eq!(
            u32_at(&reply, 0) as usize,
            reply.len(),
            "fuse_out_header.len"
        );
        let error = u32_at(&reply, 4) as i32;
        assert_eq!(
            error, 0,
            "FUSE opcode {opcode} failed with errno {}",
            -error
        );
        assert_eq!(u64_at(&reply, 8), unique, "reply for another request");
        (unique, reply)
    }
}

#[test]
fn fuse_init_lookup_open_read_through_the_mmio_transport() {
    let s = setup();
    let mem = create_guest_memory(16).unwrap();
    let fs = fs::create_fs_device(&mem, &s.config).unwrap();
    let mut guest = activate(&fs, &mem);

    // FUSE_INIT, fuse_init_in as the kernel sends it (major, minor, max_readahead, flags).
    let mut init = Vec::new();
    for v in [7u32, 31, 0x2_0000, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (_, reply) = guest.request(FUSE_INIT, 0, &init);
    let major = u32_at(&reply, OUT_HEADER_LEN);
    let minor = u32_at(&reply, OUT_HEADER_LEN + 4);
    assert_eq!(major, 7, "FUSE major version");
    assert!(minor >= 31, "virtiofsd answered minor {minor}");

    // FUSE_LOOKUP of the file in the share's root.
    let (_, reply) = guest.request(FUSE_LOOKUP, FUSE_ROOT_ID, b"hello.txt\0");
    let entry = &reply[OUT_HEADER_LEN..];
    let nodeid = u64_at(entry, 0);
    assert!(nodeid != 0 && nodeid != FUSE_ROOT_ID, "nodeid {nodeid}");
    // fuse_entry_out: 40 bytes of ids and timeouts, then fuse_attr (ino, size, ...).
    assert_eq!(u64_at(entry, 48), CONTENT.len() as u64, "attr.size");

    // FUSE_OPEN read-only, then FUSE_READ of the whole file.
    let (_, reply) = guest.request(FUSE_OPEN, nodeid, &[0u8; 8]);
    let fh = u64_at(&reply, OUT_HEADER_LEN);
    let mut read_in = Vec::new();
    read_in.extend_from_slice(&fh.to_le_bytes());
    read_in.extend_from_slice(&0u64.to_le_bytes()); // offset
    read_in.extend_from_slice(&4096u32.to_le_bytes()); // size
    read_in.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
    let (_, reply) = guest.request(FUSE_READ, nodeid, &read_in);
    assert_eq!(&reply[OUT_HEADER_LEN..], CONTENT);

    // Dropping the device stops virtiofsd and leaves nothing in the socket directory.
    let pid = fs.device.lock().unwrap().backend().unwrap().pid();
    drop(guest);
    drop(fs);
    assert!(wait_dead(pid), "virtiofsd {pid} still runs after drop");
    assert_eq!(dir_entries(s.run.path()), Vec::<String>::new());
    assert!(s.share.path().join("hello.txt").exists());
}

#[test]
fn killed_virtiofsd_is_reported_with_its_exit_and_cleaned_up() {
    let s = setup();
    let mem = create_guest_memory(16).unwrap();
    let fs = fs::create_fs_device(&mem, &s.config).unwrap();
    let guest = activate(&fs, &mem);
    let (pid, worker) = {
        let mut dev = fs.device.lock().unwrap();
        let daemon = dev.backend().unwrap();
        (
            daemon.pid(),
            daemon.worker_pid().expect("virtiofsd's sandboxed worker"),
        )
    };
    // SAFETY: kill(2) on the worker we just looked up.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);

    // The event loop sees the pidfd; process() reports the death.
    let sources = fs.device.lock().unwrap().event_sources();
    let (pidfd, _) = *sources
        .iter()
        .find(|(_, e)| *e == FsEvent::BackendExit)
        .expect("the pidfd is an event source");
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "virtiofsd's exit was not signalled on its pidfd");
    let err = fs
        .device
        .lock()
        .unwrap()
        .process(FsEvent::BackendExit)
        .expect_err("a dead virtiofsd must be an error")
        .to_string();
    assert!(
        err.contains("virtiofsd") && err.contains(&pid.to_string()) && err.contains("died"),
        "{err}"
    );

    drop(guest);
    drop(fs);
    assert!(wait_dead(pid) && wait_dead(worker));
    assert_eq!(dir_entries(s.run.path()), Vec::<String>::new());
}

#[test]
fn activation_with_dead_virtiofsd_needs_reset_and_says_why() {
    let s = setup();
    let mem = create_guest_memory(16).unwrap();
    let fs = fs::create_fs_device(&mem, &s.config).unwrap();
    let worker = fs
        .device
        .lock()
        .unwrap()
        .backend()
        .unwrap()
        .worker_pid()
        .unwrap();
    // SAFETY: kill(2) on virtiofsd's worker.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    assert!(wait_dead(worker));
    let driver = Driver {
        fs: &fs,
        mem: mem.clone(),
    };
    driver.negotiate();
    driver.setup_queue(0, 0x10_0000);
    driver.setup_queue(1, 0x20_0000);
    driver.driver_ok();
    assert_ne!(
        driver.read(STATUS) & S_NEEDS_RESET,
        0,
        "the guest must see DEVICE_NEEDS_RESET"
    );
    assert!(!fs.device.lock().unwrap().is_active());
    drop(fs);
    assert_eq!(dir_entries(s.run.path()), Vec::<String>::new());
}

#[test]
fn missing_share_dir_or_virtiofsd_is_a_clear_error_and_leaves_nothing() {
    let mut s = setup();
    let mem = create_guest_memory(16).unwrap();
    s.config.virtiofsd.share_dir = s.share.path().join("no-rootfs-here");
    let err = fs::create_fs_device(&mem, &s.config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no-rootfs-here") && err.contains("share directory"),
        "{err}"
    );

    let mut s = setup();
    s.config.virtiofsd.binary = s.run.path().join("virtiofsd-not-installed");
    let err = fs::create_fs_device(&mem, &s.config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("virtiofsd-not-installed")
            && err.contains("HUSK_VIRTIOFSD")
            && err.contains("setup.sh"),
        "{err}"
    );
    assert_eq!(dir_entries(s.run.path()), Vec::<String>::new());
}

#[test]
fn attach_places_the_device_on_a_vm_and_announces_it_on_the_kernel_command_line() {
    use husk::vmm::{BootSource, VmBuilder, VmConfig};
    let s = setup();
    let config = VmConfig::new(BootSource::Linux {
        kernel: PathBuf::from("/not/loaded/by/this/test"),
        initrd: None,
        cmdline_extra: String::new(),
    });
    let mut builder = VmBuilder::new(config).unwrap();
    let (fs, slot) = fs::attach_fs_device(&mut builder, &s.config).unwrap();
    let line = builder.kernel_args().unwrap().cmdline.as_cstring().unwrap();
    let line = line.to_string_lossy();
    let expected = format!("virtio_mmio.device=4K@{:#x}:{}", slot.base, slot.irq);
    assert!(line.contains(&expected), "{expected} not in {line}");
    // The transport on the VM's bus is the virtio-fs one.
    let mut id = [0u8; 4];
    fs.transport.lock().unwrap().read(DEVICE_ID, &mut id);
    assert_eq!(u32::from_le_bytes(id), 26);
    drop(builder);
    drop(fs);
    assert_eq!(dir_entries(s.run.path()), Vec::<String>::new());
}
