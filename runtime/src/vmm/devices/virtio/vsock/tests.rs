//! The vsock device end to end against in-memory guest memory and real Unix sockets: the
//! test plays a guest driver and a small guest vsock stack that keeps its side of the
//! credit rules and checks the device keeps its own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{RXQ, TXQ};
use super::packet::{op, shutdown, Header, Packet, HEADER_SIZE, TYPE_STREAM};
use super::*;
use crate::vmm::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::vmm::devices::virtio::{Interrupt, VirtioDevice};

const CID: u64 = 7;
/// The guest's receive window per stream: small, so credit runs out often.
const GUEST_BUF_ALLOC: u32 = 8 * 1024;
/// Linux's RX buffer: a header plus 4 KiB.
const RX_PAYLOAD: u32 = 4096;
const RX_BUFS: u64 = 64;
const TX_SLOTS: u64 = 64;
const SLOT: u64 = 0x2000;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x20_0000;

/// The guest's side of one stream.
#[derive(Default)]
struct GuestStream {
    established: bool,
    rst: bool,
    /// Bytes received (and consumed at once).
    received: Vec<u8>,
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Bytes to send, and how many were sent.
    outbox: VecDeque<u8>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// SHUTDOWN flags the host sent.
    peer_shutdown: u32,
    /// Send SHUTDOWN(SEND) once the outbox is empty.
    close_when_done: bool,
    shutdown_sent: bool,
    /// Echo what arrives, upper-cased, and close once the host closed.
    echo: bool,
    /// Ignore the host's credit (a misbehaving guest).
    ignore_credit: bool,
}

/// Guest memory, the three queues as a driver sees them, the device, and a guest stack.
struct Guest {
    mem: GuestMemoryMmap,
    dev: Vsock,
    irq: Arc<Interrupt>,
    rxq: DriverQueue,
    txq: DriverQueue,
    /// RX chain head -> (header address, payload address).
    rx_bufs: HashMap<u16, (GuestAddress, GuestAddress)>,
    tx_free: Vec<GuestAddress>,
    tx_bufs: HashMap<u16, GuestAddress>,
    inbox: VecDeque<Packet>,
    /// Streams by (guest port, host port).
    streams: HashMap<(u32, u32), GuestStream>,
    /// Guest ports that accept REQUESTs (echo streams).
    listening: HashSet<u32>,
    /// REQUESTs the guest saw, and packets that matched no stream.
    requests: Vec<Header>,
    unmatched: Vec<Packet>,
}

impl Guest {
    fn new(uds: &Path, conn_buf_size: u32) -> Self {
        let mem = guest_memory(0x40_0000);
        let mut config = VsockConfig::new(uds.to_owned());
        config.guest_cid = CID;
        config.conn_buf_size = conn_buf_size;
        let mut dev = Vsock::new(&config).unwrap();
        let mut rxq = DriverQueue::new(&mem, GuestAddress(0x1000), 256);
        let txq = DriverQueue::new(&mem, GuestAddress(0x4000), 256);
        let evq = DriverQueue::new(&mem, GuestAddress(0x7000), 256);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(
            mem.clone(),
            irq.clone(),
            vec![rxq.device_queue(), txq.device_queue(), evq.device_queue()],
        )
        .unwrap();
        let mut rx_bufs = HashMap::new();
        for i in 0..RX_BUFS {
            let slot = GuestAddress(RX_BASE + i * SLOT);
            // Half the buffers are one descriptor, half split header / payload, as older
            // and newer Linux drivers do.
            let (head, bufs) = if i % 2 == 0 {
                let b = Buf {
                    addr: slot,
                    len: HEADER_SIZE as u32 + RX_PAYLOAD,
                    device_writes: true,
                };
                (
                    rxq.add_chain(&[b]).unwrap(),
                    (slot, GuestAddress(slot.0 + HEADER_SIZE as u64)),
                )
            } else {
                let data = GuestAddress(slot.0 + 0x100);
                let h = Buf {
                    addr: slot,
                    len: HEADER_SIZE as u32,
                    device_writes: true,
                };
                let d = Buf {
                    addr: data,
                    len: RX_PAYLOAD,
                    device_writes: true,
                };
                (rxq.add_chain(&[h, d]).unwrap(), (slot, data))
            };
            rx_bufs.insert(head, bufs);
        }
        Self {
            mem,
            dev,
            irq,
            rxq,
            txq,
            rx_bufs,
            tx_free: (0..TX_SLOTS)
                .map(|i| GuestAddress(TX_BASE + i * SLOT))
                .collect(),
            tx_bufs: HashMap::new(),
            inbox: VecDeque::new(),
            streams: HashMap::new(),
            listening: HashSet::new(),
            requests: Vec::new(),
            unmatched: Vec::new(),
        }
    }

    fn notify(&mut self, queue: usize, event: VsockEvent) {
        self.dev.queue_events()[queue].write(1).unwrap();
        self.dev.process(event).unwrap();
    }

    /// Puts one packet on the TX queue and kicks the device.
    fn send_raw(&mut self, hdr: Header, data: &[u8]) {
        self.reclaim_tx();
        let slot = self.tx_free.pop().expect("no free TX slot");
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        self.mem.write_slice(&hdr.to_bytes(), slot).unwrap();
        self.mem
            .write_slice(data, GuestAddress(slot.0 + HEADER_SIZE as u64))
            .unwrap();
        let len = (HEADER_SIZE + data.len()) as u32;
        let head = self
            .txq
            .add_chain(&[Buf {
                addr: slot,
                len,
                device_writes: false,
            }])
            .unwrap();
        self.tx_bufs.insert(head, slot);
        self.notify(TXQ, VsockEvent::TxQueue);
        self.reclaim_tx();
        self.collect_rx();
    }

    fn reclaim_tx(&mut self) {
        while let Some((head, len)) = self.txq.pop_used() {
            assert_eq!(len, 0, "the device writes nothing into TX buffers");
            self.tx_free.push(self.tx_bufs.remove(&head).unwrap());
        }
    }

    /// Takes the packets the device wrote and gives the buffers back. Returns how many.
    fn collect_rx(&mut self) -> usize {
        let mut n = 0;
        while let Some((head, len)) = self.rxq.pop_used() {
            let (h, d) = self.rx_bufs.remove(&head).unwrap();
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, h).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                len as usize,
                HEADER_SIZE + hdr.len as usize,
                "used len of {hdr:?}"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, d).unwrap();
            self.inbox.push_back(Packet { hdr, data });
            let bufs: Vec<Buf> = if d.0 == h.0 + HEADER_SIZE as u64 {
                vec![Buf {
                    addr: h,
                    len: HEADER_SIZE as u32 + RX_PAYLOAD,
                    device_writes: true,
                }]
            } else {
                vec![
                    Buf {
                        addr: h,
                        len: HEADER_SIZE as u32,
                        device_writes: true,
                    },
                    Buf {
                        addr: d,
                        len: RX_PAYLOAD,
                        device_writes: true,
                    },
                ]
            };
            let head = self.rxq.add_chain(&bufs).unwrap();
            self.rx_bufs.insert(head, (h, d));
            n += 1;
        }
        if n > 0 {
            assert!(
                self.irq.irq_evt().read().is_ok(),
                "used RX buffers come with an interrupt"
            );
            self.notify(RXQ, VsockEvent::RxQueue);
        }
        n
    }

    fn hdr(&self, key: (u32, u32), opcode: u16, flags: u32) -> Header {
        let s = self.streams.get(&key);
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op: opcode,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: s.map_or(0, |s| s.fwd_cnt),
        }
    }

    /// Sends a packet on stream `key`, updating what the host knows of our credit.
    fn send(&mut self, key: (u32, u32), opcode: u16, flags: u32, data: &[u8]) {
        let hdr = self.hdr(key, opcode, flags);
        if let Some(s) = self.streams.get_mut(&key) {
            s.fwd_cnt_sent = s.fwd_cnt;
        }
        self.send_raw(hdr, data);
    }

    fn connect(&mut self, guest_port: u32, host_port: u32) -> (u32, u32) {
        let key = (guest_port, host_port);
        self.streams.insert(key, GuestStream::default());
        self.send(key, op::REQUEST, 0, &[]);
        key
    }

    /// One round: host sockets, packets in, credit updates and data out. Returns whether
    /// anything moved.
    fn step(&mut self) -> bool {
        self.dev.process(VsockEvent::Backend).unwrap();
        let mut moved = self.collect_rx() > 0;
        while let Some(pkt) = self.inbox.pop_front() {
            moved = true;
            self.handle(pkt);
        }
        let keys: Vec<(u32, u32)> = self.streams.keys().copied().collect();
        for key in keys {
            moved |= self.drive(key);
        }
        moved
    }

    fn handle(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, CID, TYPE_STREAM),
            "{h:?}"
        );
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.requests.push(h);
            if self.listening.contains(&h.dst_port) && !self.streams.contains_key(&key) {
                let s = GuestStream {
                    established: true,
                    echo: true,
                    ..Default::default()
                };
                self.streams.insert(key, s);
                self.send(key, op::RESPONSE, 0, &[]);
            } else {
                self.send(key, op::RST, 0, &[]);
            }
            let s = self.streams.get_mut(&key);
            if let Some(s) = s {
                s.peer_buf_alloc = h.buf_alloc;
                s.peer_fwd_cnt = h.fwd_cnt;
            }
            return;
        }
        let Some(s) = self.streams.get_mut(&key) else {
            self.unmatched.push(pkt);
            return;
        };
        s.peer_buf_alloc = h.buf_alloc;
        s.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE => s.established = true,
            op::RW => {
                let in_window = s.received.len() as u32 - s.fwd_cnt_sent + h.len;
                assert!(
                    in_window <= GUEST_BUF_ALLOC,
                    "host overran the guest's credit"
                );
                assert_eq!(s.peer_shutdown & shutdown::SEND, 0, "data after SHUTDOWN");
                s.received.extend_from_slice(&pkt.data);
                s.fwd_cnt = s.fwd_cnt.wrapping_add(h.len);
                if s.echo {
                    s.outbox.extend(pkt.data.to_ascii_uppercase());
                }
            }
            op::SHUTDOWN => {
                s.peer_shutdown |= h.flags;
                if s.echo {
                    s.close_when_done = true;
                }
            }
            op::RST => s.rst = true,
            op::CREDIT_REQUEST => self.send(key, op::CREDIT_UPDATE, 0, &[]),
            op::CREDIT_UPDATE => {}
            other => panic!("unexpected op {other}"),
        }
    }

    fn drive(&mut self, key: (u32, u32)) -> bool {
        let mut moved = false;
        let s = &self.streams[&key];
        if !s.established || s.rst {
            return false;
        }
        if s.fwd_cnt.wrapping_sub(s.fwd_cnt_sent) >= GUEST_BUF_ALLOC / 2 {
            self.send(key, op::CREDIT_UPDATE, 0, &[]);
            moved = true;
        }
        loop {
            let s = self.streams.get_mut(&key).unwrap();
            let credit = if s.ignore_credit {
                u32::MAX
            } else {
                s.peer_buf_alloc - s.tx_cnt.wrapping_sub(s.peer_fwd_cnt)
            };
            let n = (credit as usize).min(4096).min(s.outbox.len());
            if n == 0 || s.rst || self.tx_free.len() < 2 {
                break;
            }
            let chunk: Vec<u8> = s.outbox.drain(..n).collect();
            s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
            self.send(key, op::RW, 0, &chunk);
            moved = true;
        }
        let s = &self.streams[&key];
        if s.close_when_done && s.outbox.is_empty() && !s.shutdown_sent && !s.rst {
            self.streams.get_mut(&key).unwrap().shutdown_sent = true;
            self.send(key, op::SHUTDOWN, shutdown::SEND, &[]);
            moved = true;
        }
        moved
    }

    /// Steps until `done` holds; fails after 30 s.
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if !self.step() {
                thread::sleep(Duration::from_micros(300));
            }
        }
    }
}

fn uds(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vsock.sock")
}

/// A host client: connects, sends the CONNECT line, returns the stream and the OK line.
fn host_connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    (s, String::from_utf8(line).unwrap())
}

/// Deterministic bytes that differ per stream and are not all letters.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(&uds(&dir), 4096);
    let mut b = [0u8; 8];
    g.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b4 = [0u8; 4];
    g.dev.read_config(4, &mut b4);
    assert_eq!(b4, [0; 4]);
    g.dev.read_config(6, &mut b4);
    assert_eq!(b4, [0; 4], "past the end reads zero");
    let mut reserved = VsockConfig::new(dir.path().join("other.sock"));
    reserved.guest_cid = 2;
    assert!(matches!(
        Vsock::new(&reserved),
        Err(VsockError::ReservedCid(2))
    ));
}

#[test]
fn host_initiated_connect_request_response_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let mut g = Guest::new(&path, 64 * 1024);
    g.listening.insert(1024);
    let client = thread::spawn(move || {
        let (mut s, ok) = host_connect(&path, 1024);
        s.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        s.read_exact(&mut reply).unwrap();
        (ok, reply)
    });
    g.run_until("the client", |_| client.is_finished());
    let (ok, reply) = client.join().unwrap();
    assert_eq!(g.requests.len(), 1);
    let req = g.requests[0];
    assert_eq!(req.dst_port, 1024);
    assert_eq!(ok, format!("OK {}\n", req.src_port));
    assert_eq!(&reply, b"PING");
    assert_eq!(g.streams[&(1024, req.src_port)].received, b"ping");
}

#[test]
fn guest_initiated_connect_reaches_the_port_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    let mut g = Guest::new(&path, 64 * 1024);
    let host = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"world").unwrap();
        got
    });
    let key = g.connect(40_000, 5000);
    g.run_until("RESPONSE", |g| g.streams[&key].established);
    g.streams.get_mut(&key).unwrap().outbox.extend(b"hello");
    // The host closes after answering: data, then SHUTDOWN with both flags.
    g.run_until("host close", |g| {
        g.streams[&key].peer_shutdown == shutdown::BOTH
    });
    assert_eq!(&host.join().unwrap(), b"hello");
    assert_eq!(g.streams[&key].received, b"world");
}

#[test]
fn unknown_ports_and_connections_get_rst() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let mut g = Guest::new(&path, 4096);
    // No listener for port 6000.
    let key = g.connect(40_001, 6000);
    g.run_until("RST", |g| g.streams[&key].rst);
    assert!(!g.streams[&key].established);
    // Data and credit requests on a connection that does not exist.
    for opcode in [op::RW, op::CREDIT_REQUEST, op::SHUTDOWN] {
        let hdr = Header {
            op: opcode,
            ..g.hdr((40_002, 7000), opcode, 0)
        };
        g.send_raw(hdr, b"x");
    }
    // An RST for an unknown connection is not answered.
    g.send_raw(g.hdr((40_003, 7000), op::RST, 0), &[]);
    g.run_until("3 RSTs", |g| g.unmatched.len() >= 3);
    for _ in 0..20 {
        g.step();
    }
    assert_eq!(g.unmatched.len(), 3);
    for p in &g.unmatched {
        assert_eq!(
            (p.hdr.op, p.hdr.src_port, p.hdr.dst_port),
            (op::RST, 7000, 40_002)
        );
    }
    // A host client asking for a port the guest refuses sees EOF instead of OK.
    let client = thread::spawn(move || host_connect(&path, 9999).1);
    g.run_until("client done", |_| client.is_finished());
    assert_eq!(client.join().unwrap(), "");
    assert_eq!(g.dev.muxer.connection_count(), 0);
}

#[test]
fn packets_from_the_wrong_cid_or_type_are_not_connected() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let _listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    let mut g = Guest::new(&path, 4096);
    let mut spoofed = g.hdr((40_000, 5000), op::REQUEST, 0);
    spoofed.src_cid = CID + 1;
    g.send_raw(spoofed, &[]);
    let mut dgram = g.hdr((40_000, 5000), op::REQUEST, 0);
    dgram.type_ = 2;
    g.send_raw(dgram, &[]);
    for _ in 0..10 {
        g.step();
    }
    assert_eq!(g.dev.muxer.connection_count(), 0);
    // The spoofed one is dropped; the wrong type is refused with an RST.
    assert_eq!(g.unmatched.len(), 1);
    assert_eq!(g.unmatched[0].hdr.op, op::RST);
}

/// A host client that sends `out` then half-closes, and reads until EOF.
fn host_echo_client(
    path: PathBuf,
    port: u32,
    out: Vec<u8>,
) -> thread::JoinHandle<(String, Vec<u8>)> {
    thread::spawn(move || {
        let (s, ok) = host_connect(&path, port);
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            w.write_all(&out).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        (ok, got)
    })
}

#[test]
fn megabytes_both_ways_in_order_through_small_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    // 8 KiB windows on both sides, 1.5 MiB each way.
    let mut g = Guest::new(&path, 8 * 1024);
    g.listening.insert(1024);
    let data = pattern(1, 3 << 19);
    let client = host_echo_client(path, 1024, data.clone());
    g.run_until("the client", |_| client.is_finished());
    let (ok, echoed) = client.join().unwrap();
    assert!(ok.starts_with("OK "));
    assert_eq!(echoed.len(), data.len());
    assert!(
        echoed == data.to_ascii_uppercase(),
        "bytes lost or reordered"
    );
    let key = *g.streams.keys().next().unwrap();
    assert!(g.streams[&key].received == data);
    // Both directions shut: the device ends the stream with an RST and forgets it.
    g.run_until("RST", |g| g.streams[&key].rst);
    assert_eq!(g.dev.muxer.connection_count(), 0);
}

#[test]
fn half_close_each_way_keeps_the_other_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let listener = UnixListener::bind(format!("{}_5001", path.display())).unwrap();
    let mut g = Guest::new(&path, 8 * 1024);
    let host = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"abc").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let key = g.connect(40_010, 5001);
    g.run_until("host half-close", |g| g.streams[&key].peer_shutdown != 0);
    assert_eq!(
        g.streams[&key].peer_shutdown,
        shutdown::SEND,
        "the host still receives"
    );
    assert_eq!(g.streams[&key].received, b"abc");
    // The guest keeps sending after the host's half-close, then closes its side.
    let s = g.streams.get_mut(&key).unwrap();
    s.outbox.extend(b"xyz");
    s.close_when_done = true;
    g.run_until("host EOF", |_| host.is_finished());
    assert_eq!(host.join().unwrap(), b"xyz");
    g.run_until("RST", |g| g.streams[&key].rst);
    assert_eq!(g.dev.muxer.connection_count(), 0);
}

#[test]
fn sixteen_concurrent_streams() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let mut g = Guest::new(&path, 16 * 1024);
    g.listening.insert(1024);
    let inputs: Vec<Vec<u8>> = (0..16)
        .map(|i| pattern(100 + i, 96 * 1024 + i as usize))
        .collect();
    let clients: Vec<_> = inputs
        .iter()
        .map(|d| host_echo_client(path.clone(), 1024, d.clone()))
        .collect();
    g.run_until("all clients", |_| clients.iter().all(|c| c.is_finished()));
    let mut ports = HashSet::new();
    for (client, input) in clients.into_iter().zip(&inputs) {
        let (ok, echoed) = client.join().unwrap();
        assert!(ports.insert(ok), "each stream has its own host port");
        assert!(
            echoed == input.to_ascii_uppercase(),
            "stream mixed up or lost bytes"
        );
    }
    assert_eq!(g.streams.len(), 16);
}

#[test]
fn a_guest_ignoring_credit_is_reset_not_buffered_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = uds(&dir);
    let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
    let mut g = Guest::new(&path, 8 * 1024);
    let key = g.connect(40_020, 5002);
    // The host accepts but never reads.
    let (_host, _) = listener.accept().unwrap();
    g.run_until("RESPONSE", |g| g.streams[&key].established);
    let s = g.streams.get_mut(&key).unwrap();
    s.ignore_credit = true;
    s.outbox.extend(pattern(9, 4 << 20));
    g.run_until("RST", |g| g.streams[&key].rst);
    assert_eq!(g.dev.muxer.connection_count(), 0);
}
