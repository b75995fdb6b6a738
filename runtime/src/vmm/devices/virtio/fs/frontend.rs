//! The vhost-user frontend side of the device: the messages that hand virtiofsd the
//! guest memory and the virtqueues, in the order the vhost-user protocol prescribes.
//!
//! At connection: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES. At activation (the
//! guest set DRIVER_OK): SET_FEATURES with what the guest accepted, SET_MEM_TABLE, and per
//! queue SET_VRING_NUM/ADDR/BASE/CALL/KICK, then SET_VRING_ENABLE.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Protocol features the frontend uses. REPLY_ACK makes the backend confirm every
/// request, so a rejected memory table or vring fails activation instead of leaving the
/// guest waiting on a queue nobody serves. Nothing else is needed: one memory table set
/// once (no CONFIGURE_MEM_SLOTS), a fixed queue count (no MQ), no DAX window
/// (no BACKEND_REQ).
const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::REPLY_ACK;

/// Errors of the vhost-user conversation with virtiofsd.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum FrontendError {
    /// vhost-user backend at {socket} did not answer {request} within {timeout:?}; is virtiofsd (or whatever listens there) hung?
    NoAnswer {
        socket: PathBuf,
        request: &'static str,
        timeout: Duration,
    },
    /// vhost-user {request} to the backend at {socket} failed: {source}
    Request {
        socket: PathBuf,
        request: &'static str,
        source: vhost::Error,
    },
    /// vhost-user backend at {socket} does not offer VIRTIO_F_VERSION_1 (features {features:#x}); use virtiofsd from `scripts/setup.sh`
    NoVersion1 { socket: PathBuf, features: u64 },
    /// guest memory region at {addr:#x} is not backed by a shared file; virtiofsd cannot map it (create guest memory with vmm::memory::create_guest_memory)
    MemoryNotShared { addr: u64 },
    /// queue {index}: ring address {addr:#x} is outside guest memory
    RingAddress { index: usize, addr: u64 },
}

/// An open vhost-user session with one backend.
pub struct VhostUserSession {
    frontend: Frontend,
    socket: PathBuf,
    timeout: Duration,
    backend_features: u64,
    protocol_features: bool,
}

impl VhostUserSession {
    /// Takes over a connected socket and negotiates what can be negotiated before the
    /// guest driver runs. `timeout` bounds every wait for an answer.
    pub fn open(
        stream: UnixStream,
        socket: &Path,
        num_queues: usize,
        timeout: Duration,
    ) -> Result<Self, FrontendError> {
        let mut session = Self {
            frontend: Frontend::from_stream(stream, num_queues as u64),
            socket: socket.to_path_buf(),
            timeout,
            backend_features: 0,
            protocol_features: false,
        };
        session.negotiate()?;
        Ok(session)
    }

    fn negotiate(&mut self) -> Result<(), FrontendError> {
        self.call("SET_OWNER", |f| f.set_owner())?;
        self.backend_features = self.call("GET_FEATURES", |f| f.get_features())?;
        if self.backend_features & super::super::features::VERSION_1 == 0 {
            return Err(FrontendError::NoVersion1 {
                socket: self.socket.clone(),
                features: self.backend_features,
            });
        }
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Ok(());
        }
        let offered = self.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        let acked = offered & PROTOCOL_FEATURES;
        self.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        self.protocol_features = true;
        Ok(())
    }

    /// The virtio features virtiofsd offers (vhost-user bits included).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Hands virtiofsd the guest memory and the queues the driver set up. `kicks[i]` is
    /// signalled when the driver notifies queue `i` (virtiofsd polls it); virtiofsd
    /// signals `calls[i]` when it used buffers of queue `i`.
    pub fn start(
        &mut self,
        guest_features: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FrontendError> {
        let mut features = guest_features & self.backend_features;
        if self.protocol_features {
            // Must stay acked, or the backend drops the protocol features negotiated above.
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        let regions = memory_regions(mem)?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions).map(|_| ()))?;
        for (index, queue) in queues.iter().enumerate() {
            self.start_queue(index, queue, mem, &kicks[index], &calls[index])?;
        }
        Ok(())
    }

    fn start_queue(
        &mut self,
        index: usize,
        queue: &Queue,
        mem: &GuestMemoryMmap,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), FrontendError> {
        self.call("SET_VRING_NUM", |f| f.set_vring_num(index, queue.size()))?;
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host_address(mem, index, queue.desc_table())?,
            used_ring_addr: host_address(mem, index, queue.used_ring())?,
            avail_ring_addr: host_address(mem, index, queue.avail_ring())?,
            log_addr: None,
        };
        self.call("SET_VRING_ADDR", |f| f.set_vring_addr(index, &config))?;
        self.call("SET_VRING_BASE", |f| {
            f.set_vring_base(index, queue.next_avail())
        })?;
        self.call("SET_VRING_CALL", |f| f.set_vring_call(index, call))?;
        self.call("SET_VRING_KICK", |f| f.set_vring_kick(index, kick))?;
        // With protocol features, rings start disabled (vhost-user spec, "Ring states").
        if self.protocol_features {
            self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// Stops the rings (driver reset): virtiofsd stops processing them and forgets their
    /// state, so that a new [`Self::start`] can set them up again.
    pub fn stop(&mut self, num_queues: usize) -> Result<(), FrontendError> {
        for index in 0..num_queues {
            if self.protocol_features {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))?;
            }
            // GET_VRING_BASE is the request that stops a ring.
            self.call("GET_VRING_BASE", |f| f.get_vring_base(index).map(|_| ()))?;
        }
        Ok(())
    }

    /// Runs one request, bounded by the reply timeout. The vhost crate retries reads that
    /// time out (SO_RCVTIMEO would make it spin, not fail), so a watchdog shuts the socket
    /// down instead: the blocked read then returns end-of-file and the request fails. The
    /// session is unusable after that, as it would be after any lost reply.
    fn call<T>(
        &mut self,
        request: &'static str,
        op: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        let fd = self.frontend.as_raw_fd();
        let timeout = self.timeout;
        let timed_out = AtomicBool::new(false);
        let (done, wait_done) = mpsc::channel::<()>();
        let frontend = &mut self.frontend;
        let timed_out_ref = &timed_out;
        let result = std::thread::scope(|scope| {
            scope.spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = wait_done.recv_timeout(timeout) {
                    timed_out_ref.store(true, Ordering::SeqCst);
                    // SAFETY: `fd` is the session's socket, open for the whole scope;
                    // shutdown(2) touches no memory.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            });
            let result = op(frontend);
            let _ = done.send(());
            result
        });
        if timed_out.load(Ordering::SeqCst) {
            return Err(FrontendError::NoAnswer {
                socket: self.socket.clone(),
                request,
                timeout,
            });
        }
        result.map_err(|source| FrontendError::Request {
            socket: self.socket.clone(),
            request,
            source,
        })
    }
}

/// The memory table: every region must be a shared file mapping (the VMM's memfd), which
/// virtiofsd maps from the fd passed along with the message.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    use vm_memory::{Address, GuestMemoryRegion};
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                FrontendError::MemoryNotShared {
                    addr: region.start_addr().raw_value(),
                }
            })
        })
        .collect()
}

/// vhost-user ring addresses are the frontend's virtual addresses (translated by the
/// backend through the memory table).
fn host_address(mem: &GuestMemoryMmap, index: usize, addr: u64) -> Result<u64, FrontendError> {
    mem.get_host_address(GuestAddress(addr))
        .map(|p| p as u64)
        .map_err(|_| FrontendError::RingAddress { index, addr })
}
