//! One vsock stream between a guest port and a host Unix socket: the connection state
//! machine and its credit-based flow control (virtio 1.2, 5.10.6.3 - 5.10.6.6).
//!
//! The connection knows nothing of queues or epoll: the muxer gives it packets from the
//! guest ([`Connection::send_pkt`]), asks it for packets for the guest
//! ([`Connection::recv_pkt`]), tells it about socket readiness ([`Connection::notify`]) and
//! asks which readiness it wants ([`Connection::interest`]).

use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;

use super::packet::{op, shutdown, Header, Packet, MAX_PAYLOAD, TYPE_STREAM};
use super::txbuf::TxBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The host connected; REQUEST sent (or queued), waiting for RESPONSE.
    LocalInit,
    /// Data may flow (each direction until its SHUTDOWN).
    Established,
    /// Over: an RST may still be queued for the guest, then the muxer drops it.
    Closed,
}

/// Control packets waiting to go to the guest, as bits.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const RST: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
    pub const CREDIT_REQUEST: u8 = 16;
}

/// A stream between guest port `peer_port` and the host socket behind `local_port`.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    pending: u8,

    // Guest -> host.
    /// Our receive buffer as advertised to the guest (buf_alloc).
    buf_alloc: u32,
    tx: TxBuf,
    /// Bytes at the head of `tx` written by us, not the guest (the `OK <port>` line): they
    /// do not count as forwarded guest data.
    tx_own_bytes: usize,
    /// Guest bytes handed to the host socket (fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// The fwd_cnt the guest last heard from us.
    fwd_cnt_sent: Wrapping<u32>,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest (compared with peer_fwd_cnt for the guest's free space).
    rx_cnt: Wrapping<u32>,
    /// The host socket may have bytes or EOF to read.
    readable: bool,
    /// We asked the guest for credit and have not heard back.
    credit_requested: bool,
    /// The host socket hung up: the host will neither send nor receive any more.
    host_hup: bool,
    /// We read EOF from the host and told (or will tell) the guest.
    host_eof: bool,
    /// SHUTDOWN flags to send to the guest once the data before them is out.
    shutdown_to_send: u32,

    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    /// A connection the host opened (after its `CONNECT <port>` line); the guest is asked
    /// with a REQUEST.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32, buf_alloc: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, buf_alloc, State::LocalInit);
        c.pending = pending::REQUEST;
        c
    }

    /// A connection the guest asked for with `request`, once the host socket is connected;
    /// the guest gets a RESPONSE.
    pub fn new_peer(stream: UnixStream, request: &Header, buf_alloc: u32) -> Self {
        let mut c = Self::new(
            stream,
            request.dst_port,
            request.src_port,
            buf_alloc,
            State::Established,
        );
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c.pending = pending::RESPONSE;
        c
    }

    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        state: State,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: 0,
            buf_alloc,
            tx: TxBuf::new(buf_alloc as usize + OK_LINE_MAX),
            tx_own_bytes: 0,
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: false,
            credit_requested: false,
            host_hup: false,
            host_eof: false,
            shutdown_to_send: 0,
            peer_shutdown: 0,
            host_write_shut: false,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The host socket hung up; the muxer stops polling it (a hung-up socket would report
    /// readiness forever) and the connection drains what is left on its own.
    pub fn host_hung_up(&self) -> bool {
        self.host_hup
    }

    /// Nothing left to do: the muxer can drop the connection (closing the host socket).
    pub fn is_finished(&self) -> bool {
        self.state == State::Closed && self.pending & pending::RST == 0
    }

    /// Readiness of the host socket the connection wants to hear about.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_host_data() && !self.readable {
            set |= EventSet::IN;
        }
        if !self.tx.is_empty() && self.state != State::Closed {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether [`Self::recv_pkt`] has something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        if self.pending != 0 || self.shutdown_to_send != 0 {
            return true;
        }
        // Data while the guest has room; without room, one CREDIT_REQUEST (sent from
        // recv_pkt), then the guest's credit update wakes us.
        self.wants_host_data()
            && self.readable
            && (self.peer_credit() > 0 || !self.credit_requested)
    }

    /// The host socket became ready (`events` from epoll).
    pub fn notify(&mut self, events: EventSet) {
        if self.state == State::Closed {
            return;
        }
        if events.contains(EventSet::ERROR) {
            debug!("vsock: host socket error on port {}", self.local_port);
            self.kill();
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The host gave up before the guest answered.
                self.kill();
                return;
            }
            // Bytes the host wrote before closing are still to be read.
            self.readable = true;
        }
        if events.contains(EventSet::IN) {
            self.readable = true;
        }
        if events.contains(EventSet::OUT) || (self.host_hup && !self.tx.is_empty()) {
            self.flush_tx();
        }
        self.check_done();
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, pkt: &Packet) {
        let hdr = &pkt.hdr;
        if self.state == State::Closed {
            return;
        }
        // Every packet carries the sender's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (_, op::RST) => {
                self.state = State::Closed;
                self.pending = 0;
            }
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                let line = format!("OK {}\n", self.local_port);
                // Fits: the buffer is empty and has OK_LINE_MAX bytes on top of buf_alloc.
                if self.tx.push(line.as_bytes()).is_ok() {
                    self.tx_own_bytes = line.len();
                }
                self.flush_tx();
            }
            (State::Established, op::RW) => self.take_guest_data(&pkt.data),
            // The new credit was taken above; has_pending_rx() now says if data waits.
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.pending |= pending::CREDIT_UPDATE,
            (State::Established, op::SHUTDOWN) => self.peer_shutdown_flags(hdr.flags),
            (state, other) => {
                warn!("vsock: op {other} unexpected in state {state:?}, resetting");
                self.kill();
            }
        }
        self.check_done();
    }

    /// The next packet for the guest, its payload at most `max_payload` bytes.
    pub fn recv_pkt(&mut self, max_payload: usize) -> Option<Packet> {
        if self.pending & pending::RST != 0 {
            self.pending = 0;
            self.state = State::Closed;
            return Some(self.packet(op::RST, 0, Vec::new()));
        }
        for (bit, opcode) in [
            (pending::REQUEST, op::REQUEST),
            (pending::RESPONSE, op::RESPONSE),
        ] {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Some(self.packet(opcode, 0, Vec::new()));
            }
        }
        if self.wants_host_data() && self.readable {
            if let Some(pkt) = self.read_host(max_payload) {
                return Some(pkt);
            }
        }
        if self.pending & pending::RST != 0 {
            // read_host() hit an error.
            return self.recv_pkt(max_payload);
        }
        if self.shutdown_to_send != 0 {
            let flags = std::mem::take(&mut self.shutdown_to_send);
            let pkt = self.packet(op::SHUTDOWN, flags, Vec::new());
            self.check_done();
            return Some(pkt);
        }
        for (bit, opcode) in [
            (pending::CREDIT_REQUEST, op::CREDIT_REQUEST),
            (pending::CREDIT_UPDATE, op::CREDIT_UPDATE),
        ] {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Some(self.packet(opcode, 0, Vec::new()));
            }
        }
        None
    }

    /// Host data can still go to the guest: established, the host has not sent EOF, the
    /// guest still receives.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & shutdown::RCV == 0
    }

    /// Free space in the guest's receive buffer.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn read_host(&mut self, max_payload: usize) -> Option<Packet> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= pending::CREDIT_REQUEST;
            }
            return None;
        }
        let want = credit.min(max_payload).min(MAX_PAYLOAD);
        if want == 0 {
            return None;
        }
        let mut buf = vec![0u8; want];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    // A hung-up host also receives nothing more.
                    self.shutdown_to_send |= shutdown::SEND;
                    if self.host_hup {
                        self.shutdown_to_send |= shutdown::RCV;
                    }
                    return None;
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt += Wrapping(n as u32);
                    return Some(self.packet(op::RW, 0, buf));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(e) => {
                    debug!("vsock: read from host port {}: {e}", self.local_port);
                    self.kill();
                    return None;
                }
            }
        }
    }

    fn take_guest_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & shutdown::SEND != 0 {
            warn!("vsock: guest sent data after SHUTDOWN(SEND), resetting");
            self.kill();
            return;
        }
        let guest_bytes_buffered = self.tx.len() - self.tx_own_bytes;
        if guest_bytes_buffered + data.len() > self.buf_alloc as usize {
            warn!(
                "vsock: guest overran its credit on port {}, resetting",
                self.local_port
            );
            self.kill();
            return;
        }
        // The check above guarantees room, since the buffer reserves OK_LINE_MAX extra.
        if self.tx.push(data).is_err() {
            self.kill();
            return;
        }
        self.flush_tx();
    }

    fn flush_tx(&mut self) {
        match self.tx.flush_to(&mut self.stream) {
            Ok(n) => {
                let own = n.min(self.tx_own_bytes);
                self.tx_own_bytes -= own;
                self.fwd_cnt += Wrapping((n - own) as u32);
            }
            Err(e) => {
                debug!("vsock: write to host port {}: {e}", self.local_port);
                self.kill();
                return;
            }
        }
        // Tell the guest about freed space before it runs dry: at half the window, so the
        // guest is never left waiting with everything it sent already forwarded.
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= self.buf_alloc / 2 {
            self.pending |= pending::CREDIT_UPDATE;
        }
        if self.tx.is_empty() && self.peer_shutdown & shutdown::SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    fn peer_shutdown_flags(&mut self, flags: u32) {
        self.peer_shutdown |= flags & shutdown::BOTH;
        if flags & shutdown::RCV != 0 {
            // Host writes now fail with EPIPE, as the guest will not read them.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.readable = false;
        }
        if flags & shutdown::SEND != 0 {
            // Shuts the host's read side once buffered data is out.
            self.flush_tx();
        }
    }

    /// Ends the connection when neither direction can carry data any more. The guest hears
    /// RST, which for Linux completes its close.
    fn check_done(&mut self) {
        if self.state != State::Established || !self.tx.is_empty() {
            return;
        }
        let guest_done = self.peer_shutdown == shutdown::BOTH;
        let both_sent =
            self.peer_shutdown & shutdown::SEND != 0 && self.host_eof && self.shutdown_to_send == 0;
        if guest_done || both_sent {
            self.kill();
        }
    }

    /// Resets the connection: the guest gets an RST, then the muxer drops it.
    fn kill(&mut self) {
        self.state = State::Closed;
        self.pending = pending::RST;
        self.shutdown_to_send = 0;
    }

    fn packet(&mut self, opcode: u16, flags: u32, data: Vec<u8>) -> Packet {
        // Every packet tells the guest our credit, so it also serves as a credit update.
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        Packet {
            hdr: Header {
                src_cid: 0, // the muxer fills in the CIDs
                dst_cid: 0,
                src_port: self.local_port,
                dst_port: self.peer_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op: opcode,
                flags,
                buf_alloc: self.buf_alloc,
                fwd_cnt: self.fwd_cnt.0,
            },
            data,
        }
    }
}

/// Room for "OK 4294967295\n".
const OK_LINE_MAX: usize = 16;
