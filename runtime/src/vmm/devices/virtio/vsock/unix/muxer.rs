//! Routes packets between the guest and the host's Unix sockets, one [`Connection`] per
//! stream, and polls all those sockets through one nested epoll fd, so the VMM event loop
//! watches a single fd for the whole backend.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::handshake::{Handshake, Progress};
use crate::vmm::devices::virtio::vsock::connection::Connection;
use crate::vmm::devices::virtio::vsock::packet::{op, Header, Packet, TYPE_STREAM};
use crate::vmm::devices::virtio::vsock::HOST_CID;

/// Limits that keep a guest or host client from growing the muxer without bound.
const MAX_CONNECTIONS: usize = 1024;
const MAX_HANDSHAKES: usize = 64;
/// Resets for unknown connections waiting for RX buffers; past this the device stops
/// taking TX packets until the guest gives RX buffers.
pub const MAX_QUEUED_RESETS: usize = 256;
/// Host-side ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MuxerError {
    /// cannot listen on {path}: {source}
    Listen { path: PathBuf, source: io::Error },
    /// epoll: {0}
    Epoll(#[source] io::Error),
}

/// A stream is named by its host port and guest port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// What an fd in the nested epoll is.
#[derive(Clone, Copy, Debug)]
enum Source {
    Listener,
    Handshake,
    Conn(ConnKey),
}

/// The host side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Receive buffer size of each connection, advertised to the guest as buf_alloc.
    conn_buf_size: u32,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    sources: HashMap<RawFd, Source>,
    /// Interest registered for each connection fd (None: not polled any more).
    registered: HashMap<ConnKey, Option<EventSet>>,
    /// Connections with packets for the guest, in turn, each at most once.
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    /// RSTs for packets that match no connection.
    resets: VecDeque<ConnKey>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens at `uds_path`, which must not exist yet.
    pub fn new(guest_cid: u64, uds_path: &Path, conn_buf_size: u32) -> Result<Self, MuxerError> {
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let mut muxer = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conn_buf_size,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            sources: HashMap::new(),
            registered: HashMap::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        };
        let fd = muxer.listener.as_raw_fd();
        muxer
            .watch(fd, Source::Listener, EventSet::IN)
            .map_err(MuxerError::Epoll)?;
        Ok(muxer)
    }

    /// The fd the VMM event loop polls for readability; then call [`Self::process_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live streams.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether [`Self::recv_pkt`] has something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rxq.is_empty()
    }

    /// Too many resets wait for RX buffers: stop taking TX packets for now.
    pub fn is_backlogged(&self) -> bool {
        self.resets.len() >= MAX_QUEUED_RESETS
    }

    /// Drops every stream (device reset). The listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.unwatch(fd);
            self.handshakes.remove(&fd);
        }
        self.rxq.clear();
        self.in_rxq.clear();
        self.resets.clear();
    }

    /// Handles readiness of the host sockets without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let fd = ev.fd();
                match self.sources.get(&fd).copied() {
                    Some(Source::Listener) => self.accept_all(),
                    Some(Source::Handshake) => self.advance_handshake(fd),
                    Some(Source::Conn(key)) => {
                        if let Some(conn) = self.conns.get_mut(&key) {
                            conn.notify(ev.event_set());
                        }
                        self.update(key);
                    }
                    None => debug!("vsock: event for fd {fd} no longer watched"),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// A packet from the guest (its source CID already checked by the device).
    pub fn send_pkt(&mut self, pkt: &Packet) {
        let hdr = &pkt.hdr;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            self.reset_unknown(key, hdr.op);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(pkt);
            self.update(key);
            return;
        }
        if hdr.op == op::REQUEST {
            self.connect_to_host(hdr);
        } else {
            self.reset_unknown(key, hdr.op);
        }
    }

    /// The next packet for the guest, its payload at most `max_payload` bytes.
    pub fn recv_pkt(&mut self, max_payload: usize) -> Option<Packet> {
        if let Some(key) = self.resets.pop_front() {
            return Some(self.addressed(Packet {
                hdr: Header {
                    src_port: key.local_port,
                    dst_port: key.peer_port,
                    type_: TYPE_STREAM,
                    op: op::RST,
                    ..Header::default()
                },
                data: Vec::new(),
            }));
        }
        while let Some(key) = self.rxq.pop_front() {
            self.in_rxq.remove(&key);
            let pkt = self
                .conns
                .get_mut(&key)
                .and_then(|c| c.recv_pkt(max_payload));
            // Back in line behind the others if it has more: streams take turns.
            self.update(key);
            if let Some(pkt) = pkt {
                return Some(self.addressed(pkt));
            }
        }
        None
    }

    fn addressed(&self, mut pkt: Packet) -> Packet {
        pkt.hdr.src_cid = HOST_CID;
        pkt.hdr.dst_cid = self.guest_cid;
        pkt
    }

    fn reset_unknown(&mut self, key: ConnKey, opcode: u16) {
        // Never answer an RST with an RST.
        if opcode != op::RST && self.resets.len() < MAX_QUEUED_RESETS {
            self.resets.push_back(key);
        }
    }

    /// The guest connects to host port `hdr.dst_port`: the listener at `<uds>_<port>`.
    fn connect_to_host(&mut self, hdr: &Header) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!(
                "vsock: too many connections, refusing port {}",
                hdr.dst_port
            );
            self.reset_unknown(key, hdr.op);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        // A Unix connect completes at once or fails (only a full backlog would make it
        // wait), so it is done inline.
        let stream = UnixStream::connect(&path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match stream {
            Ok(stream) => {
                let conn = Connection::new_peer(stream, hdr, self.conn_buf_size);
                self.add(key, conn);
            }
            Err(e) => {
                debug!("vsock: guest connect to {path:?}: {e}");
                self.reset_unknown(key, hdr.op);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES {
                        warn!("vsock: too many pending host connections, dropping one");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self.watch(fd, Source::Handshake, EventSet::IN).is_ok() {
                        self.handshakes.insert(fd, Handshake::new(stream));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!("vsock: accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match h.advance() {
            Progress::Pending => {}
            Progress::Failed => {
                self.unwatch(fd);
                self.handshakes.remove(&fd);
            }
            Progress::Connect(peer_port) => {
                self.unwatch(fd);
                let Some(h) = self.handshakes.remove(&fd) else {
                    return;
                };
                if self.conns.len() >= MAX_CONNECTIONS {
                    warn!("vsock: too many connections, dropping host client");
                    return;
                }
                let Some(local_port) = self.allocate_local_port(peer_port) else {
                    return;
                };
                let conn =
                    Connection::new_local(h.stream, local_port, peer_port, self.conn_buf_size);
                self.add(
                    ConnKey {
                        local_port,
                        peer_port,
                    },
                    conn,
                );
            }
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        warn!("vsock: no free host port for a connection to guest port {peer_port}");
        None
    }

    fn add(&mut self, key: ConnKey, conn: Connection) {
        let fd = conn.stream().as_raw_fd();
        let interest = conn.interest();
        if self.watch(fd, Source::Conn(key), interest).is_err() {
            return;
        }
        self.registered.insert(key, Some(interest));
        self.conns.insert(key, conn);
        self.update(key);
    }

    /// After anything happened to a connection: drop it if it is done, else bring its
    /// epoll interest and its place in the RX queue up to date.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.is_finished() {
            self.remove(key);
            return;
        }
        let fd = conn.stream().as_raw_fd();
        let wanted = (!conn.host_hung_up()).then(|| conn.interest());
        let pending = conn.has_pending_rx();
        let current = self.registered.get(&key).copied().flatten();
        if wanted != current {
            let result = match wanted {
                Some(set) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(set, fd as u64),
                ),
                None => {
                    self.sources.remove(&fd);
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
            };
            if let Err(e) = result {
                warn!("vsock: epoll_ctl for port {}: {e}", key.local_port);
            }
            self.registered.insert(key, wanted);
        }
        if pending && self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            if self.registered.remove(&key).flatten().is_some() {
                self.unwatch(conn.stream().as_raw_fd());
            }
        }
        // A stale key left in rxq is skipped by recv_pkt.
    }

    fn watch(&mut self, fd: RawFd, source: Source, set: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))?;
        self.sources.insert(fd, source);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        self.sources.remove(&fd);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            debug!("vsock: epoll delete of fd {fd}: {e}");
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file outlives the listener otherwise, and a new VM could not bind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
