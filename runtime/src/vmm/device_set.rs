//! The virtio devices a [`VmConfig`](super::VmConfig) asks for (the root disk, vsock,
//! virtio-fs shares, a NIC):
//! created at build time, then driven by the VM's event loop, which polls
//! [`DeviceSet::event_sources`] and hands each ready fd to [`DeviceSet::handle`].
//!
//! Every transport here defers its activation to the event loop (see
//! [`MmioTransport::defer_activation`]): the vhost-user handshake with virtiofsd must not
//! run on a vCPU thread, and doing the same for vsock keeps one activation path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::builder::{BuildError, VmBuilder};
use super::config::{
    FsBackend, FsShareConfig, NetDeviceConfig, VirtioDevicesConfig, VsockDeviceConfig,
};
use super::devices::virtio::block::{Block, BlockError, BlockEvent};
use super::devices::virtio::fs::{
    FsConfig, FsError, FsEvent, VirtioFs, VirtiofsdConfig, DEFAULT_REPLY_TIMEOUT,
};
use super::devices::virtio::mmio::{ActivationFailed, MmioError, MmioTransport};
use super::devices::virtio::net::{Net, NetError, NetEvent};
use super::devices::virtio::vsock::{Vsock, VsockConfig, VsockError, VsockEvent};
use super::devices::virtio::VirtioDevice;

/// Errors creating or running the configured devices.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DeviceSetError {
    /// root disk: {0}
    Block(#[from] BlockError),
    /// vsock device ({path}): {source}
    Vsock { path: String, source: VsockError },
    /// virtio-fs share {tag:?} ({dir}): {source}
    Fs {
        tag: String,
        dir: String,
        source: FsError,
    },
    /// virtio-net device on tap {tap}: {source}
    Net { tap: String, source: NetError },
    /// virtio transport: {0}
    Transport(#[from] MmioError),
    /// cannot create or duplicate a device eventfd: {0}
    EventFd(#[source] io::Error),
    /// placing a virtio device: {0}
    Build(#[from] Box<BuildError>),
    /// {0}
    Activation(#[from] ActivationFailed),
}

/// The root disk's serial (`/sys/block/vda/serial` in the guest).
const ROOT_DISK_SERIAL: &str = "husk-root";

/// What one polled fd stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A transport's deferred activation is due.
    Activate(usize),
    Block(BlockEvent),
    Vsock(VsockEvent),
    /// An event of the n-th share's device.
    Fs(usize, FsEvent),
    Net(NetEvent),
}

/// What the event loop should do after [`DeviceSet::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Continue,
    /// The fd is done (e.g. a pidfd that stays readable): stop polling it.
    StopPolling(RawFd),
}

struct Share {
    tag: String,
    dir: String,
    device: Arc<Mutex<VirtioFs>>,
}

/// The devices and their transports. Dropping it closes every vsock stream on the host
/// side (so clients see EOF, not a hang) and stops virtiofsd.
#[derive(Default)]
pub struct DeviceSet {
    root_disk: Option<Arc<Mutex<Block>>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    shares: Vec<Share>,
    net: Option<Arc<Mutex<Net>>>,
    /// Transports with deferred activation, each with the eventfd that says it is due.
    transports: Vec<(Arc<Mutex<MmioTransport>>, EventFd)>,
}

impl DeviceSet {
    /// Creates the devices of `config` and places them on `builder`'s MMIO bus, the root
    /// disk image first when there is one. On error nothing keeps running: devices
    /// created so far are dropped (virtiofsd killed, sockets removed).
    pub fn create(
        builder: &mut VmBuilder,
        config: &VirtioDevicesConfig,
        root_disk: Option<&Path>,
    ) -> Result<Self, DeviceSetError> {
        let mut set = Self::default();
        if let Some(image) = root_disk {
            let device = Arc::new(Mutex::new(Block::open(image, ROOT_DISK_SERIAL)?));
            set.place(builder, device.clone())?;
            set.root_disk = Some(device);
        }
        if let Some(vsock) = &config.vsock {
            set.add_vsock(builder, vsock)?;
        }
        for share in &config.shares {
            set.add_share(builder, share)?;
        }
        if let Some(net) = &config.net {
            set.add_net(builder, net)?;
        }
        Ok(set)
    }

    fn add_net(
        &mut self,
        builder: &mut VmBuilder,
        config: &NetDeviceConfig,
    ) -> Result<(), DeviceSetError> {
        let err = |source| DeviceSetError::Net {
            tap: config.tap.name().to_owned(),
            source,
        };
        let tap = config.tap.try_clone().map_err(|e| err(NetError::Tap(e)))?;
        let device = Net::new(tap, config.config).map_err(err)?;
        let device = Arc::new(Mutex::new(device));
        self.place(builder, device.clone())?;
        self.net = Some(device);
        Ok(())
    }

    fn add_vsock(
        &mut self,
        builder: &mut VmBuilder,
        config: &VsockDeviceConfig,
    ) -> Result<(), DeviceSetError> {
        let mut vsock_config = VsockConfig::new(config.uds_path.clone());
        vsock_config.guest_cid = config.guest_cid;
        let device = Vsock::new(&vsock_config).map_err(|source| DeviceSetError::Vsock {
            path: config.uds_path.display().to_string(),
            source,
        })?;
        let device = Arc::new(Mutex::new(device));
        self.place(builder, device.clone())?;
        self.vsock = Some(device);
        Ok(())
    }

    fn add_share(
        &mut self,
        builder: &mut VmBuilder,
        share: &FsShareConfig,
    ) -> Result<(), DeviceSetError> {
        let fs_err = |source| DeviceSetError::Fs {
            tag: share.tag.clone(),
            dir: share.dir.display().to_string(),
            source,
        };
        let device = match &share.backend {
            FsBackend::Spawn { virtiofsd } => {
                let virtiofsd = VirtiofsdConfig::new(
                    virtiofsd.clone(),
                    share.dir.clone(),
                    share.socket_path.clone(),
                );
                VirtioFs::new(&FsConfig::new(share.tag.clone(), virtiofsd)).map_err(fs_err)?
            }
            FsBackend::Connected { stream } => {
                let stream = stream
                    .try_clone()
                    .map_err(|e| fs_err(FsError::Connection(e)))?;
                VirtioFs::with_backend(
                    &share.tag,
                    stream,
                    &share.socket_path,
                    None,
                    DEFAULT_REPLY_TIMEOUT,
                )
                .map_err(fs_err)?
            }
        };
        let device = Arc::new(Mutex::new(device));
        self.place(builder, device.clone())?;
        self.shares.push(Share {
            tag: share.tag.clone(),
            dir: share.dir.display().to_string(),
            device,
        });
        Ok(())
    }

    /// Wraps `device` in a transport with deferred activation and puts it on the bus.
    fn place<D: VirtioDevice + 'static>(
        &mut self,
        builder: &mut VmBuilder,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceSetError> {
        let mut transport = MmioTransport::new(builder.memory().clone(), device)?;
        let activate_evt = transport
            .defer_activation()
            .map_err(DeviceSetError::EventFd)?;
        let irq = transport
            .interrupt()
            .irq_evt()
            .try_clone()
            .map_err(DeviceSetError::EventFd)?;
        let notify = transport
            .queue_notify_eventfds()
            .map_err(DeviceSetError::EventFd)?;
        let transport = Arc::new(Mutex::new(transport));
        builder
            .add_mmio_device(transport.clone(), &irq, &notify)
            .map_err(Box::new)?;
        self.transports.push((transport, activate_evt));
        Ok(())
    }

    /// The transports this set placed, in the order they were placed (snapshots).
    pub fn transports(&self) -> impl ExactSizeIterator<Item = &Arc<Mutex<MmioTransport>>> {
        self.transports.iter().map(|(transport, _)| transport)
    }

    /// The vsock device, if configured (a restore resets its transport).
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vsock.as_ref()
    }

    /// The fds to poll for readability, each with what it means.
    pub fn event_sources(&self) -> Vec<(RawFd, DeviceEvent)> {
        let mut sources: Vec<_> = self
            .transports
            .iter()
            .enumerate()
            .map(|(i, (_, evt))| (evt.as_raw_fd(), DeviceEvent::Activate(i)))
            .collect();
        if let Some(disk) = &self.root_disk {
            let disk = disk.lock().expect("virtio-blk lock poisoned");
            sources.extend(
                disk.event_sources()
                    .iter()
                    .map(|&(fd, ev)| (fd, DeviceEvent::Block(ev))),
            );
        }
        if let Some(vsock) = &self.vsock {
            let vsock = vsock.lock().expect("vsock lock poisoned");
            sources.extend(
                vsock
                    .event_sources()
                    .iter()
                    .map(|&(fd, ev)| (fd, DeviceEvent::Vsock(ev))),
            );
        }
        if let Some(net) = &self.net {
            let net = net.lock().expect("virtio-net lock poisoned");
            sources.extend(
                net.event_sources()
                    .iter()
                    .map(|&(fd, ev)| (fd, DeviceEvent::Net(ev))),
            );
        }
        for (i, share) in self.shares.iter().enumerate() {
            let fs = share.device.lock().expect("virtio-fs lock poisoned");
            sources.extend(
                fs.event_sources()
                    .into_iter()
                    .map(|(fd, ev)| (fd, DeviceEvent::Fs(i, ev))),
            );
        }
        sources
    }

    /// Handles one ready fd. An error means the VM cannot go on (virtiofsd died, an
    /// activation failed); vsock errors are logged, the device stays usable.
    pub fn handle(&mut self, event: DeviceEvent, fd: RawFd) -> Result<Handled, DeviceSetError> {
        match event {
            DeviceEvent::Activate(i) => self.activate(i)?,
            DeviceEvent::Block(ev) => self.block_event(ev),
            DeviceEvent::Vsock(ev) => self.vsock_event(ev),
            DeviceEvent::Net(ev) => self.net_event(ev),
            DeviceEvent::Fs(i, ev) => {
                let Some(share) = self.shares.get(i) else {
                    return Ok(Handled::Continue);
                };
                let mut fs = share.device.lock().expect("virtio-fs lock poisoned");
                let result = fs.process(ev);
                if ev == FsEvent::BackendExit {
                    result.map_err(|source| DeviceSetError::Fs {
                        tag: share.tag.clone(),
                        dir: share.dir.clone(),
                        source,
                    })?;
                    return Ok(Handled::StopPolling(fd));
                }
                if let Err(e) = result {
                    warn!("virtio-fs {:?}: {e}", share.tag);
                }
            }
        }
        Ok(Handled::Continue)
    }

    fn activate(&mut self, index: usize) -> Result<(), DeviceSetError> {
        let Some((transport, _)) = self.transports.get(index) else {
            return Ok(());
        };
        let activated = transport
            .lock()
            .expect("virtio transport lock poisoned")
            .activate_pending()?;
        if activated {
            info!("virtio device in slot {index} activated");
            // Queue kicks that arrived before the activation were consumed by an inactive
            // device: look at the queues once now.
            self.block_event(BlockEvent::Queue);
            self.vsock_event(VsockEvent::TxQueue);
            self.vsock_event(VsockEvent::RxQueue);
            self.net_event(NetEvent::TxQueue);
            self.net_event(NetEvent::RxQueue);
        }
        Ok(())
    }

    fn block_event(&self, event: BlockEvent) {
        process_logged(&self.root_disk, "virtio-blk", |disk| disk.process(event));
    }

    fn net_event(&self, event: NetEvent) {
        process_logged(&self.net, "virtio-net", |net| net.process(event));
    }

    fn vsock_event(&self, event: VsockEvent) {
        process_logged(&self.vsock, "vsock", |vsock| vsock.process(event));
    }
}

/// Hands an event to `device`, if configured. Its errors are logged: a frame or request
/// is lost, or an interrupt could not be raised, and the device stays usable.
fn process_logged<D, E: std::fmt::Display>(
    device: &Option<Arc<Mutex<D>>>,
    name: &str,
    process: impl FnOnce(&mut D) -> Result<(), E>,
) {
    let Some(device) = device else {
        return;
    };
    let mut device = device
        .lock()
        .unwrap_or_else(|_| panic!("{name} lock poisoned"));
    if let Err(e) = process(&mut device) {
        warn!("{name}: {e}");
    }
}
