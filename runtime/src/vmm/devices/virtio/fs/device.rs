//! The virtio-fs device (virtio 1.2, 5.11) as a vhost-user frontend: the VMM owns the
//! transport, the config space and the interrupt; virtiofsd owns the queues' contents.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frontend::{FrontendError, VhostUserSession};
use super::virtiofsd::{Virtiofsd, VirtiofsdConfig, VirtiofsdError};
use crate::vmm::devices::virtio::{
    device_type, features, read_config_space, ActivateError, Interrupt, VirtioDevice,
};

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the one request
/// queue: one is enough for a guest with few vCPUs, and virtiofsd serves each queue from
/// one thread.
pub const NUM_QUEUES: usize = 2;
const NUM_REQUEST_QUEUES: u32 = (NUM_QUEUES - 1) as u32;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Length of the tag field of the config space (5.11.4).
pub const TAG_LEN: usize = 36;
const CONFIG_LEN: usize = TAG_LEN + 4;
/// How long virtiofsd may take to answer one vhost-user request.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Ring features passed through from virtiofsd to the driver. VERSION_1 is required; the
/// vhost-user bit (PROTOCOL_FEATURES, bit 30) is between the VMM and virtiofsd only.
const GUEST_FEATURES: u64 =
    features::VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum FsError {
    /// virtio-fs tag {tag:?} is invalid: {reason}; use 1 to 36 bytes without NUL (the guest mounts it with `mount -t virtiofs TAG DIR`)
    InvalidTag { tag: String, reason: &'static str },
    /// {0}
    Virtiofsd(#[from] VirtiofsdError),
    /// {0}
    Frontend(#[from] FrontendError),
    /// cannot create or read a virtio-fs eventfd: {0}
    EventFd(#[source] io::Error),
    /// cannot raise the virtio-fs interrupt: {0}
    Interrupt(#[source] io::Error),
    /// cannot take an fd on the connection to the virtiofsd started before the jail: {0}
    Connection(#[source] io::Error),
}

/// One share: the directory virtiofsd serves and the tag the guest mounts it by.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub tag: String,
    pub virtiofsd: VirtiofsdConfig,
    /// How long virtiofsd may take to answer one vhost-user request.
    pub reply_timeout: Duration,
}

impl FsConfig {
    pub fn new(tag: impl Into<String>, virtiofsd: VirtiofsdConfig) -> Self {
        Self {
            tag: tag.into(),
            virtiofsd,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }
}

pub(super) struct Active {
    pub(super) interrupt: Arc<Interrupt>,
}

/// The virtio-fs device.
pub struct VirtioFs {
    config_space: [u8; CONFIG_LEN],
    // Declared before `backend`: fields drop in order, so the socket closes before
    // virtiofsd is killed.
    session: VhostUserSession,
    avail_features: u64,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    pub(super) call_events: Vec<EventFd>,
    pub(super) active: Option<Active>,
    pub(super) backend: Option<Virtiofsd>,
}

impl VirtioFs {
    /// Starts virtiofsd on the share and connects to it. Nothing is left running if this
    /// fails.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        validate_tag(&config.tag)?;
        let (daemon, stream) = Virtiofsd::start(&config.virtiofsd)?;
        let socket = daemon.socket_path().to_path_buf();
        Self::with_backend(
            &config.tag,
            stream,
            &socket,
            Some(daemon),
            config.reply_timeout,
        )
    }

    /// A device on an already connected vhost-user backend. With `daemon`, the device owns
    /// that process: it reports its death and kills it when dropped.
    pub fn with_backend(
        tag: &str,
        stream: UnixStream,
        socket: &Path,
        daemon: Option<Virtiofsd>,
        reply_timeout: Duration,
    ) -> Result<Self, FsError> {
        validate_tag(tag)?;
        // On error `daemon` is dropped, which kills virtiofsd.
        let session = VhostUserSession::open(stream, socket, NUM_QUEUES, reply_timeout)?;
        let new_events = || {
            (0..NUM_QUEUES)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<Vec<_>>>()
                .map_err(FsError::EventFd)
        };
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..tag.len()].copy_from_slice(tag.as_bytes());
        config_space[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Self {
            config_space,
            avail_features: session.backend_features() & GUEST_FEATURES,
            session,
            acked_features: 0,
            queue_events: new_events()?,
            call_events: new_events()?,
            active: None,
            backend: daemon,
        })
    }

    /// The virtiofsd process, if this device started it.
    pub fn backend(&mut self) -> Option<&mut Virtiofsd> {
        self.backend.as_mut()
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn start_backend(&mut self, mem: &GuestMemoryMmap, queues: &[Queue]) -> Result<(), FsError> {
        // A dead virtiofsd would otherwise surface as a broken pipe; say what happened.
        if let Some(daemon) = self.backend.as_mut() {
            daemon.check_alive()?;
        }
        let features = self.acked_features;
        let result =
            self.session
                .start(features, mem, queues, &self.queue_events, &self.call_events);
        if let (Err(_), Some(daemon)) = (&result, self.backend.as_mut()) {
            daemon.check_alive()?;
        }
        Ok(result?)
    }
}

pub(super) fn validate_tag(tag: &str) -> Result<(), FsError> {
    let reason = if tag.is_empty() {
        "it is empty"
    } else if tag.len() > TAG_LEN {
        "it is longer than 36 bytes"
    } else if tag.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(FsError::InvalidTag {
        tag: tag.to_string(),
        reason,
    })
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// The kick eventfds: virtiofsd polls them itself, so the VMM registers them as
    /// ioeventfds but must not poll them (see `event_sources`).
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-fs: {}-byte write to the read-only config space at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActivateError::check(self.active.is_some(), NUM_QUEUES, queues.len())?;
        self.start_backend(&mem, &queues)
            .map_err(|e| ActivateError::Backend(Box::new(e)))?;
        self.active = Some(Active { interrupt });
        Ok(())
    }

    fn reset(&mut self) {
        if self.active.take().is_none() {
            return;
        }
        if let Err(e) = self.session.stop(NUM_QUEUES) {
            warn!("virtio-fs: stopping virtiofsd's rings at reset failed: {e}");
        }
        for evt in self.queue_events.iter().chain(&self.call_events) {
            // Drop notifications of the old rings.
            let _ = evt.read();
        }
    }
}
