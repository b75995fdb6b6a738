//! The virtio-vsock device: three queues (RX, TX, event), the guest CID in config space,
//! and the muxer on the host side.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{Packet, HEADER_SIZE};
use super::unix::{Muxer, MuxerError};
use super::{DEFAULT_GUEST_CID, HOST_CID};
use crate::vmm::devices::virtio::{
    device_type, features, read_config_space, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
};

/// Queue indexes (5.10.2).
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Default receive buffer per stream, advertised to the guest as buf_alloc (Linux's
/// default buffer size).
pub const DEFAULT_CONN_BUF_SIZE: u32 = 256 * 1024;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VsockError {
    /// guest CID {0} is reserved (CIDs 0, 1, 2 and u32::MAX are not guest addresses)
    ReservedCid(u64),
    /// host side: {0}
    Muxer(#[from] MuxerError),
    /// cannot create or read a queue eventfd: {0}
    EventFd(#[source] io::Error),
    /// cannot raise the interrupt: {0}
    Interrupt(#[source] io::Error),
}

/// What the VMM configures.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The VM's socket; guest connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
    /// Receive buffer per stream, advertised to the guest.
    pub conn_buf_size: u32,
}

impl VsockConfig {
    pub fn new(uds_path: PathBuf) -> Self {
        Self {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path,
            conn_buf_size: DEFAULT_CONN_BUF_SIZE,
        }
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    pub(super) muxer: Muxer,
    queue_events: Vec<EventFd>,
    active: Option<ActiveQueues>,
}

impl Vsock {
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        let cid = config.guest_cid;
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(cid));
        }
        let queue_events = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VsockError::EventFd)?;
        Ok(Self {
            guest_cid: cid,
            muxer: Muxer::new(cid, &config.uds_path, config.conn_buf_size)?,
            queue_events,
            active: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Fills guest RX buffers with what the muxer has for the guest.
    pub(super) fn process_rx(&mut self) -> Result<(), VsockError> {
        let Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        }) = self.active.as_mut()
        else {
            return Ok(());
        };
        let rxq = &mut queues[RXQ];
        let mut used_any = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = rxq.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let room = writer.available_bytes();
                    if room < HEADER_SIZE {
                        warn!("vsock: RX buffer of {room} bytes cannot hold a header");
                        0
                    } else if let Some(pkt) = self.muxer.recv_pkt(room - HEADER_SIZE) {
                        pkt.write_to(&mut writer, room).unwrap_or_else(|e| {
                            warn!("vsock: RX packet lost: {e}");
                            0
                        })
                    } else {
                        // Nothing after all: give the buffer back to the ring.
                        rxq.go_to_previous_position();
                        break;
                    }
                }
                Err(e) => {
                    warn!("vsock: bad RX descriptor chain: {e}");
                    0
                }
            };
            if let Err(e) = rxq.add_used(mem, head, written) {
                warn!("vsock: cannot return RX buffer: {e}");
            }
            used_any = true;
        }
        if used_any {
            interrupt
                .signal_used_buffer()
                .map_err(VsockError::Interrupt)?;
        }
        Ok(())
    }

    /// Hands the guest's TX packets to the muxer.
    pub(super) fn process_tx(&mut self) -> Result<(), VsockError> {
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
        // Each TX packet may need an answer; stop while too many answers wait for RX room.
        while !self.muxer.is_backlogged() {
            let Some(chain) = txq.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let available = reader.available_bytes();
                    match Packet::read_from(&mut reader, available) {
                        Ok(pkt) if pkt.hdr.src_cid != self.guest_cid => {
                            warn!("vsock: packet from CID {} dropped", pkt.hdr.src_cid)
                        }
                        Ok(pkt) if pkt.hdr.dst_cid != HOST_CID => {
                            warn!("vsock: packet to CID {} dropped", pkt.hdr.dst_cid)
                        }
                        Ok(pkt) => self.muxer.send_pkt(&pkt),
                        Err(e) => warn!("vsock: TX packet dropped: {e}"),
                    }
                }
                Err(e) => warn!("vsock: bad TX descriptor chain: {e}"),
            }
            if let Err(e) = txq.add_used(mem, head, 0) {
                warn!("vsock: cannot return TX buffer: {e}");
            }
            used_any = true;
        }
        if used_any {
            interrupt
                .signal_used_buffer()
                .map_err(VsockError::Interrupt)?;
        }
        Ok(())
    }
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the only vsock event (virtio 1.2, 5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    /// Host-side streams open now (a snapshot records whether the guest has any).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Tells the guest that the transport was reset, as after a restore from a snapshot:
    /// the driver drops every connection (the host side has none: the muxer is new) and
    /// re-reads the guest CID; listening sockets stay. Returns false when the device is not
    /// active or the guest posted no event buffer.
    pub fn send_transport_reset(&mut self) -> Result<bool, VsockError> {
        let Some(ActiveQueues {
            mem,
            interrupt,
            queues,
        }) = self.active.as_mut()
        else {
            return Ok(false);
        };
        let evq = &mut queues[EVQ];
        let Some(chain) = evq.pop_descriptor_chain(&*mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match chain.writer(mem) {
            Ok(mut writer) => match std::io::Write::write_all(&mut writer, &event) {
                Ok(()) => event.len() as u32,
                Err(e) => {
                    warn!("vsock: cannot write the transport reset event: {e}");
                    0
                }
            },
            Err(e) => {
                warn!("vsock: bad event descriptor chain: {e}");
                0
            }
        };
        if let Err(e) = evq.add_used(mem, head, written) {
            warn!("vsock: cannot return the event buffer: {e}");
        }
        interrupt
            .signal_used_buffer()
            .map_err(VsockError::Interrupt)?;
        Ok(written != 0)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only: with no feature bit, the stream type is implied.
        features::VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    /// `struct virtio_vsock_config { le64 guest_cid; }`, read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn!("vsock: guest write to read-only config at {offset:#x} ignored");
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
        self.muxer.reset();
    }
}
