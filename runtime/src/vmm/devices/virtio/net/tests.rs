//! The net device against in-memory guest memory and a real tap inside a network
//! namespace the test creates. A packet socket bound to the tap stands for the network:
//! what the device writes to the tap arrives on it, what it sends leaves through the tap
//! towards the device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{RXQ, TXQ};
use super::offload;
use super::rate_limiter::RateLimiter;
use super::tap::VNET_HDR_LEN;
use super::*;
use crate::net::Netns;
use crate::vmm::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::vmm::devices::virtio::{features, Interrupt, VirtioDevice};

const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x02];
const TAP: &str = "tap0";
/// IEEE "local experimental" EtherType: only our test frames carry it.
const ETHERTYPE: u16 = 0x88b5;
const BUF_LEN: u32 = 2048;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x20_0000;

/// A named network namespace, deleted on drop (with every interface in it).
struct TestNetns {
    name: String,
    netns: Netns,
}

impl TestNetns {
    fn new(tag: &str) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "net device tests need root (network namespaces, taps)"
        );
        let name = format!("husk-netdev-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let netns = Netns::open(&PathBuf::from(format!("/run/netns/{name}"))).unwrap();
        Self { name, netns }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An AF_PACKET socket bound to one interface.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Must run inside the namespace.
    fn bind(ifname: &str) -> Self {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(raw >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a new socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = Self::addr(ifindex, proto);
        // SAFETY: `addr` is a sockaddr_ll of the size given, valid for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        Self { fd, ifindex }
    }

    fn addr(ifindex: i32, proto: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex;
        addr
    }

    /// Sends a frame out of the interface (towards the tap's reader: the device).
    fn send(&self, frame: &[u8]) {
        let addr = Self::addr(self.ifindex, ETHERTYPE.to_be());
        // SAFETY: `frame` and `addr` are valid for the lengths given during the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next test frame that arrives on the interface, or None after a second.
    fn recv(&self) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if n <= 0 {
                return None;
            }
            let mut buf = vec![0u8; 70_000];
            // SAFETY: `buf` is writable for its length during the call.
            let len =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(len >= 0, "{}", std::io::Error::last_os_error());
            buf.truncate(len as usize);
            if buf.len() >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                return Some(buf);
            }
        }
    }
}

/// An Ethernet frame of our test type carrying `tag` and `len` payload bytes.
fn frame(dst: [u8; 6], src: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..len).map(|i| tag.wrapping_add(i as u8)));
    f
}

const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// A namespace with a tap, a packet socket on it, the device and its driver's queues.
struct Fixture {
    _ns: TestNetns,
    sock: PacketSocket,
    mem: GuestMemoryMmap,
    dev: Net,
    irq: Arc<Interrupt>,
    rxq: DriverQueue,
    txq: DriverQueue,
    next_rx: u64,
    next_tx: u64,
}

impl Fixture {
    fn new(tag: &str, acked: u64) -> Self {
        let ns = TestNetns::new(tag);
        let tap = ns
            .netns
            .run(|| {
                // No IPv6 chatter on the tap: only the frames the test sends.
                std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").ok();
                Tap::create(TAP)
            })
            .unwrap()
            .unwrap();
        ns.ip(&["link", "set", "dev", TAP, "up"]);
        let sock = ns.netns.run(|| PacketSocket::bind(TAP)).unwrap();
        let mut dev = Net::new(
            tap,
            NetConfig {
                mac: MAC,
                mtu: 1500,
            },
        )
        .unwrap();
        let mem = guest_memory(0x40_0000);
        let rxq = DriverQueue::new(&mem, GuestAddress(0x1000), 256);
        let txq = DriverQueue::new(&mem, GuestAddress(0x4000), 256);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.ack_features(acked);
        dev.activate(
            mem.clone(),
            irq.clone(),
            vec![rxq.device_queue(), txq.device_queue()],
        )
        .unwrap();
        Self {
            _ns: ns,
            sock,
            mem,
            dev,
            irq,
            rxq,
            txq,
            next_rx: 0,
            next_tx: 0,
        }
    }

    fn add_rx_buffers(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = GuestAddress(RX_BASE + self.next_rx * u64::from(BUF_LEN));
            self.next_rx += 1;
            self.rxq
                .add_chain(&[Buf {
                    addr,
                    len,
                    device_writes: true,
                }])
                .unwrap();
        }
    }

    /// Puts a frame on TX after a zero header; `split` puts header and frame in two
    /// descriptors, as Linux does for frames in fragments.
    fn send_tx(&mut self, frame: &[u8], split: bool) {
        let addr = GuestAddress(TX_BASE + self.next_tx * 0x1_0000);
        self.next_tx += 1;
        self.mem.write_slice(&[0u8; VNET_HDR_LEN], addr).unwrap();
        let data = GuestAddress(addr.0 + VNET_HDR_LEN as u64);
        self.mem.write_slice(frame, data).unwrap();
        let bufs = if split {
            vec![
                Buf {
                    addr,
                    len: VNET_HDR_LEN as u32,
                    device_writes: false,
                },
                Buf {
                    addr: data,
                    len: frame.len() as u32,
                    device_writes: false,
                },
            ]
        } else {
            vec![Buf {
                addr,
                len: (VNET_HDR_LEN + frame.len()) as u32,
                device_writes: false,
            }]
        };
        self.txq.add_chain(&bufs).unwrap();
    }

    fn kick(&mut self, event: NetEvent) {
        match event {
            NetEvent::RxQueue => self.dev.queue_events()[RXQ].write(1).unwrap(),
            NetEvent::TxQueue => self.dev.queue_events()[TXQ].write(1).unwrap(),
            NetEvent::Tap => {}
        }
        self.dev.process(event).unwrap();
    }

    /// The frames the device put in RX buffers (headers checked and stripped).
    fn received(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Some((head, len)) = self.rxq.pop_used() {
            let desc = self.rxq.desc.0 + 16 * u64::from(head);
            let addr: u64 = self.mem.read_obj(GuestAddress(desc)).unwrap();
            let mut buf = vec![0u8; len as usize];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert!(buf.len() > VNET_HDR_LEN, "used length {len}");
            assert_eq!(&buf[10..12], &1u16.to_le_bytes(), "num_buffers");
            frames.push(buf.split_off(VNET_HDR_LEN));
        }
        frames
    }

    /// Whether the VMM loop would hear the tap source now.
    fn tap_source_ready(&self) -> bool {
        let (fd, _) = self.dev.event_sources()[2];
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }
}

const ALL: u64 = features::VERSION_1 | offload::OFFERED;

#[test]
fn config_space_holds_mac_link_up_and_mtu() {
    let f = Fixture::new("cfg", ALL);
    let mut config = [0u8; 12];
    f.dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
    // A read past the end is zeroes; a write is ignored.
    let mut tail = [0xffu8; 4];
    f.dev.read_config(10, &mut tail);
    assert_eq!(tail, [0xdc, 0x05, 0, 0]);
    let avail = f.dev.avail_features();
    for bit in [offload::MAC, offload::MTU, offload::STATUS, offload::CSUM] {
        assert_ne!(avail & bit, 0);
    }
    assert_ne!(avail & offload::GUEST_TSO4, 0);
    assert_eq!(
        avail & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6),
        0
    );
    assert_eq!(
        avail & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF),
        0
    );
}

#[test]
fn bad_mtu_or_mac_is_refused() {
    let ns = TestNetns::new("bad");
    let tap = || ns.netns.run(|| Tap::create(TAP)).unwrap().unwrap();
    let err = Net::new(tap(), NetConfig { mac: MAC, mtu: 67 })
        .err()
        .unwrap();
    assert!(matches!(err, NetError::Mtu(67)), "{err}");
    let mut multicast = MAC;
    multicast[0] |= 1;
    let err = Net::new(
        tap(),
        NetConfig {
            mac: multicast,
            mtu: 1500,
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, NetError::Mac(_)), "{err}");
}

#[test]
fn tx_frames_reach_the_tap_in_order() {
    let mut f = Fixture::new("tx", ALL);
    let sent: Vec<Vec<u8>> = (0..6)
        .map(|i| frame([0xff; 6], MAC, i * 10, 60 + 100 * usize::from(i)))
        .collect();
    for (i, fr) in sent.iter().enumerate() {
        f.send_tx(fr, i % 2 == 1);
    }
    f.kick(NetEvent::TxQueue);
    for fr in &sent {
        assert_eq!(f.sock.recv().as_ref(), Some(fr));
    }
    let mut used = 0;
    while let Some((_, len)) = f.txq.pop_used() {
        assert_eq!(len, 0);
        used += 1;
    }
    assert_eq!(used, sent.len());
    assert_ne!(f.irq.status(), 0, "used-buffer interrupt raised");
    let stats = f.dev.stats();
    assert_eq!((stats.tx_frames, stats.tx_dropped), (6, 0));
}

#[test]
fn tx_frame_without_room_for_a_header_is_dropped_and_returned() {
    let mut f = Fixture::new("txbad", ALL);
    let addr = GuestAddress(TX_BASE);
    f.txq
        .add_chain(&[Buf {
            addr,
            len: 8,
            device_writes: false,
        }])
        .unwrap();
    let good = frame([0xff; 6], MAC, 7, 64);
    f.next_tx = 1;
    f.send_tx(&good, false);
    f.kick(NetEvent::TxQueue);
    assert_eq!(f.sock.recv(), Some(good), "the next frame still goes out");
    assert_eq!(f.dev.stats().tx_dropped, 1);
    assert!(f.txq.pop_used().is_some() && f.txq.pop_used().is_some());
}

#[test]
fn tap_frames_arrive_in_rx_buffers_in_order() {
    let mut f = Fixture::new("rx", ALL);
    f.add_rx_buffers(8, BUF_LEN);
    let sent: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(MAC, PEER, i, 50 + 200 * usize::from(i)))
        .collect();
    for fr in &sent {
        f.sock.send(fr);
    }
    f.kick(NetEvent::Tap);
    assert_eq!(f.received(), sent);
    assert_ne!(f.irq.status(), 0);
    assert_eq!(f.dev.stats().rx_frames, 5);
}

#[test]
fn a_full_rx_queue_keeps_the_pending_frame_and_goes_quiet() {
    let mut f = Fixture::new("rxfull", ALL);
    f.add_rx_buffers(2, BUF_LEN);
    let sent: Vec<Vec<u8>> = (0..5).map(|i| frame(MAC, PEER, i, 100)).collect();
    for fr in &sent {
        f.sock.send(fr);
    }
    f.kick(NetEvent::Tap);
    assert_eq!(f.received(), sent[..2]);
    // Frames wait in the tap and one in the device; the loop must not hear the tap.
    assert!(
        !f.tap_source_ready(),
        "the tap source would spin the event loop"
    );
    f.add_rx_buffers(2, BUF_LEN);
    f.kick(NetEvent::RxQueue);
    assert_eq!(f.received(), sent[2..4]);
    f.add_rx_buffers(4, BUF_LEN);
    f.kick(NetEvent::RxQueue);
    assert_eq!(f.received(), sent[4..]);
    // All delivered: listening to the tap again.
    let late = frame(MAC, PEER, 9, 100);
    f.sock.send(&late);
    assert!(f.tap_source_ready());
    f.kick(NetEvent::Tap);
    assert_eq!(f.received(), vec![late]);
    assert_eq!(f.dev.stats().rx_dropped, 0);
}

#[test]
fn a_frame_larger_than_the_rx_buffer_is_dropped_and_the_buffer_kept() {
    let mut f = Fixture::new("rxbig", ALL);
    f.add_rx_buffers(1, 200);
    let big = frame(MAC, PEER, 1, 400);
    let small = frame(MAC, PEER, 2, 60);
    f.sock.send(&big);
    f.sock.send(&small);
    f.kick(NetEvent::Tap);
    assert_eq!(f.received(), vec![small]);
    assert_eq!(f.dev.stats().rx_dropped, 1);
}

#[test]
fn rx_header_flags_are_cleared_without_guest_csum() {
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
    assert!(device::fix_rx_header(&mut hdr, features::VERSION_1));
    assert_eq!(hdr[0], 0);
    hdr[0] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
    assert!(device::fix_rx_header(&mut hdr, ALL));
    assert_ne!(hdr[0], 0, "kept with GUEST_CSUM");
    hdr[1] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    assert!(
        device::fix_rx_header(&mut hdr, ALL),
        "TSO4 with GUEST_TSO4 goes to the guest"
    );
    assert!(
        !device::fix_rx_header(&mut hdr, ALL & !offload::GUEST_TSO4),
        "GUEST_TSO4 was not negotiated"
    );
    hdr[1] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    assert!(!device::fix_rx_header(&mut hdr, ALL), "never TSO6");
}

#[test]
fn tap_offloads_follow_the_accepted_features() {
    use offload::{tap_flags, GUEST_CSUM, GUEST_TSO4};
    assert_eq!(tap_flags(0), 0);
    assert_eq!(tap_flags(GUEST_TSO4), 0, "TSO4 needs GUEST_CSUM");
    assert_eq!(tap_flags(GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        tap_flags(GUEST_CSUM | GUEST_TSO4),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4
    );
}

/// Lets `budget` frames through, then refuses.
struct Budget(Arc<AtomicU64>);

impl RateLimiter for Budget {
    fn consume(&mut self, _bytes: u64) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }
}

#[test]
fn a_refusing_limiter_delays_frames_without_losing_them() {
    let mut f = Fixture::new("limit", ALL);
    let budget = Arc::new(AtomicU64::new(1));
    f.dev.set_rate_limiters(
        Some(Box::new(Budget(budget.clone()))),
        Some(Box::new(Budget(budget.clone()))),
    );
    let tx: Vec<Vec<u8>> = (0..3).map(|i| frame([0xff; 6], MAC, i, 80)).collect();
    for fr in &tx {
        f.send_tx(fr, false);
    }
    f.kick(NetEvent::TxQueue);
    assert_eq!(f.sock.recv().as_ref(), Some(&tx[0]));
    assert_eq!(f.sock.recv(), None, "the limiter held the rest");
    budget.store(10, Ordering::SeqCst);
    f.kick(NetEvent::TxQueue);
    assert_eq!(f.sock.recv().as_ref(), Some(&tx[1]));
    assert_eq!(f.sock.recv().as_ref(), Some(&tx[2]));

    budget.store(0, Ordering::SeqCst);
    f.add_rx_buffers(4, BUF_LEN);
    let rx = frame(MAC, PEER, 5, 80);
    f.sock.send(&rx);
    f.kick(NetEvent::Tap);
    assert!(f.received().is_empty());
    assert!(!f.tap_source_ready());
    budget.store(1, Ordering::SeqCst);
    f.kick(NetEvent::RxQueue);
    assert_eq!(f.received(), vec![rx]);
}

#[test]
fn nothing_moves_before_activation_or_after_reset() {
    let mut f = Fixture::new("reset", ALL);
    f.dev.reset();
    assert!(!f.dev.is_active());
    f.add_rx_buffers(1, BUF_LEN);
    f.sock.send(&frame(MAC, PEER, 1, 60));
    // The reset ran on a vCPU thread: the event loop hears of the tap once more, takes
    // nothing from it and stops polling it.
    f.kick(NetEvent::Tap);
    assert!(f.rxq.pop_used().is_none());
    assert!(!f.tap_source_ready(), "a reset device must not be polled");
}
