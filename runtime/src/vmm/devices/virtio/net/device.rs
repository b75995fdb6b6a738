//! The virtio-net device (virtio 1.2, 5.1): one RX and one TX queue, no control queue,
//! MAC, MTU and link status in config space, frames moved between the queues and a tap.

use std::io;
use std::sync::Arc;

use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rate_limiter::RateLimiter;
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{offload, MAX_FRAME_LEN};
use crate::vmm::devices::virtio::{
    device_type, features, read_config_space, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
};

/// Queue indexes (5.1.2).
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Smallest MTU the spec lets the device advertise (5.1.4.1).
pub const MIN_MTU: u16 = 68;
/// Length of the config space we expose: mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Errors of the net device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetError {
    /// MTU {0} is below the minimum of 68 that virtio-net allows; give the interface a larger MTU
    Mtu(u16),
    /// MAC {0:02x?} is multicast or all zeroes; a NIC needs a unicast address
    Mac([u8; 6]),
    /// {0}
    Tap(#[from] TapError),
    /// cannot create or read a queue eventfd: {0}
    EventFd(#[source] io::Error),
    /// cannot set up the tap's epoll: {0}
    Epoll(#[source] io::Error),
    /// reading the tap failed: {0}
    TapRead(#[source] io::Error),
    /// cannot raise the interrupt: {0}
    Interrupt(#[source] io::Error),
}

/// What the VMM configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest NIC's address: the one the container engine gave the namespace's
    /// interface, so the peers' ARP caches stay right.
    pub mac: [u8; 6],
    /// The namespace interface's MTU.
    pub mtu: u16,
}

/// Frame counters, for `husk inspect` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the tap that no guest buffer could hold, or with offloads the guest
    /// did not accept.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Guest frames that were malformed or that the tap refused.
    pub tx_dropped: u64,
}

/// The virtio-net device.
pub struct Net {
    pub(super) tap: Tap,
    config: NetConfig,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    /// Holds only the tap, so that the VMM's level-triggered loop can stop hearing about
    /// a readable tap while the guest has no RX buffers (see `set_tap_interest`).
    pub(super) tap_epoll: Epoll,
    tap_interest: bool,
    /// One frame read from the tap that is not yet in a guest buffer (header included).
    rx_frame: Vec<u8>,
    rx_frame_len: usize,
    tx_frame: Vec<u8>,
    rx_limiter: Option<Box<dyn RateLimiter>>,
    tx_limiter: Option<Box<dyn RateLimiter>>,
    stats: NetStats,
    active: Option<ActiveQueues>,
}

impl Net {
    /// A device over `tap` (which `Tap::create` made, in the right namespace).
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
        if config.mtu < MIN_MTU {
            return Err(NetError::Mtu(config.mtu));
        }
        if config.mac == [0; 6] || config.mac[0] & 1 != 0 {
            return Err(NetError::Mac(config.mac));
        }
        let queue_events = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(NetError::EventFd)?;
        let tap_epoll = Epoll::new().map_err(NetError::Epoll)?;
        use std::os::fd::AsRawFd;
        // Registered with no events: nothing to hear until the driver is ready.
        tap_epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), 0),
            )
            .map_err(NetError::Epoll)?;
        Ok(Self {
            tap,
            config,
            acked_features: 0,
            queue_events,
            tap_epoll,
            tap_interest: false,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_frame_len: 0,
            tx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_limiter: None,
            tx_limiter: None,
            stats: NetStats::default(),
            active: None,
        })
    }

    /// Installs rate limiters (none exists yet: see [`super::rate_limiter`]).
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<Box<dyn RateLimiter>>,
        tx: Option<Box<dyn RateLimiter>>,
    ) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    pub fn config(&self) -> NetConfig {
        self.config
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Turns polling of the tap on or off. Off while a frame waits for a guest buffer:
    /// the loop is level-triggered, and a readable tap we cannot drain would spin it.
    /// Turning it back on re-arms epoll, which reports a tap that is still readable.
    fn set_tap_interest(&mut self, on: bool) -> Result<(), NetError> {
        if self.tap_interest == on {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.tap_epoll
            .ctl(
                ControlOperation::Modify,
                self.tap.as_raw_fd(),
                EpollEvent::new(events, 0),
            )
            .map_err(NetError::Epoll)?;
        self.tap_interest = on;
        Ok(())
    }

    /// Moves frames from the tap into guest RX buffers, in order, until the tap is empty
    /// or the guest has no buffer left (then the frame in hand waits for the next one).
    pub(super) fn process_rx(&mut self) -> Result<(), NetError> {
        let Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        }) = self.active.as_mut()
        else {
            // Reset on a vCPU thread (see `reset`): stop hearing about the tap here.
            return self.set_tap_interest(false);
        };
        let rxq = &mut queues[RXQ];
        let mut used_any = false;
        let mut blocked = false;
        loop {
            if self.rx_frame_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        warn!("net: short frame of {n} bytes from the tap dropped");
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_frame_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(NetError::TapRead(e)),
                }
                if !fix_rx_header(&mut self.rx_frame[..VNET_HDR_LEN], self.acked_features) {
                    self.stats.rx_dropped += 1;
                    self.rx_frame_len = 0;
                    continue;
                }
            }
            let len = self.rx_frame_len;
            if let Some(limiter) = self.rx_limiter.as_mut() {
                if !limiter.consume(len as u64) {
                    blocked = true;
                    break;
                }
            }
            let Some(chain) = rxq.pop_descriptor_chain(&*mem) else {
                blocked = true;
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) if writer.available_bytes() >= len => {
                    use std::io::Write;
                    match writer.write_all(&self.rx_frame[..len]) {
                        Ok(()) => {
                            self.stats.rx_frames += 1;
                            self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                            len
                        }
                        Err(e) => {
                            warn!("net: writing an RX buffer failed, frame dropped: {e}");
                            self.stats.rx_dropped += 1;
                            0
                        }
                    }
                }
                Ok(writer) => {
                    // The driver sized its buffers for the MTU it was told; a larger frame
                    // (say, from a peer with a larger MTU) is dropped and the buffer kept.
                    warn!(
                        "net: {len}-byte frame does not fit a {}-byte RX buffer, dropped",
                        writer.available_bytes()
                    );
                    self.stats.rx_dropped += 1;
                    self.rx_frame_len = 0;
                    rxq.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    // A broken chain: return it empty, keep the frame for the next one.
                    warn!("net: bad RX descriptor chain: {e}");
                    if let Err(e) = rxq.add_used(mem, head, 0) {
                        warn!("net: cannot return RX buffer: {e}");
                    }
                    used_any = true;
                    continue;
                }
            };
            self.rx_frame_len = 0;
            if let Err(e) = rxq.add_used(mem, head, written as u32) {
                warn!("net: cannot return RX buffer: {e}");
            }
            used_any = true;
        }
        if used_any {
            interrupt
                .signal_used_buffer()
                .map_err(NetError::Interrupt)?;
        }
        self.set_tap_interest(!blocked)
    }

    /// Hands the guest's TX frames to the tap, in order.
    pub(super) fn process_tx(&mut self) -> Result<(), NetError> {
        let Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        }) = self.active.as_mut()
        else {
            return Ok(());
        };
        let txq = &mut queues[TXQ];
        let mut used_any = false;
        while let Some(chain) = txq.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    if len <= VNET_HDR_LEN || len > self.tx_frame.len() {
                        warn!("net: TX frame of {len} bytes (header included) dropped");
                        self.stats.tx_dropped += 1;
                    } else if let Some(false) =
                        self.tx_limiter.as_mut().map(|l| l.consume(len as u64))
                    {
                        // Not now: the chain stays first in the queue.
                        txq.go_to_previous_position();
                        break;
                    } else {
                        use std::io::Read;
                        let frame = &mut self.tx_frame[..len];
                        let sent = reader
                            .read_exact(frame)
                            .and_then(|()| self.tap.write_frame(frame));
                        match sent {
                            Ok(_) => {
                                self.stats.tx_frames += 1;
                                self.stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                            }
                            // The kernel checks the header (e.g. a GSO request it cannot
                            // honour) and refuses bad frames: drop, as a NIC would.
                            Err(e) => {
                                warn!("net: TX frame dropped: {e}");
                                self.stats.tx_dropped += 1;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!("net: bad TX descriptor chain: {e}");
                    self.stats.tx_dropped += 1;
                }
            }
            if let Err(e) = txq.add_used(mem, head, 0) {
                warn!("net: cannot return TX buffer: {e}");
            }
            used_any = true;
        }
        if used_any {
            interrupt
                .signal_used_buffer()
                .map_err(NetError::Interrupt)?;
        }
        Ok(())
    }
}

/// Makes a header from the tap fit what the driver accepted. Returns false if the frame
/// must be dropped (a segmentation offload the guest did not accept).
pub(super) fn fix_rx_header(hdr: &mut [u8], acked: u64) -> bool {
    use virtio_bindings::virtio_net as vn;
    const FLAGS: usize = 0;
    const GSO_TYPE: usize = 1;
    let gso = hdr[GSO_TYPE];
    let tso4_ok = gso == vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8 && acked & offload::GUEST_TSO4 != 0;
    if gso != vn::VIRTIO_NET_HDR_GSO_NONE as u8 && !tso4_ok {
        // The tap only segments-offloads what `offload::tap_flags` enabled (TSO4 with
        // GUEST_TSO4); a frame with another GSO type cannot go to this guest.
        warn!("net: RX frame with GSO type {gso} dropped");
        return false;
    }
    if acked & offload::GUEST_CSUM == 0 {
        // 5.1.6.3.1: without GUEST_CSUM the device sets flags to zero (the tap computed
        // the checksum, since TUN_F_CSUM was off).
        hdr[FLAGS] = 0;
    }
    // No MRG_RXBUF: every frame is in exactly one buffer.
    hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    true
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | offload::OFFERED
    }

    fn ack_features(&mut self, features: u64) {
        // Applied to the tap at activation: this runs on a vCPU thread, whose seccomp
        // filter has no tap ioctls; activation runs on the event loop.
        self.acked_features = features;
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu; read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.config.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy devices (5.1.4.2); ours is fixed.
        warn!("net: guest write to read-only config at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActiveQueues::activate(&mut self.active, QUEUE_SIZES.len(), mem, interrupt, queues)?;
        // The tap may now give us what the guest takes. If the kernel refuses, frames
        // still arrive, fully checksummed: slower, still correct.
        if let Err(e) = self
            .tap
            .set_offload(offload::tap_flags(self.acked_features))
        {
            warn!("net: {e}; receiving without offloads");
        }
        self.set_tap_interest(true)
            .map_err(|e| ActivateError::Backend(Box::new(e)))
    }

    /// Runs on a vCPU thread (the driver writes 0 to the status register), whose seccomp
    /// filter allows no epoll or tap calls: the tap's interest is dropped by the event
    /// loop on the next tap event ([`Net::process`]), and its offloads are set again at
    /// the next activation. Nothing is read from the tap meanwhile.
    fn reset(&mut self) {
        self.active = None;
        self.rx_frame_len = 0;
        self.acked_features = 0;
    }
}
