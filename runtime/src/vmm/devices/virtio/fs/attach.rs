//! Putting a share on a VM: the device, its transport, and what the VMM must register.

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::{FsConfig, FsError, VirtioFs};
use crate::vmm::builder::{BuildError, MmioSlot, VmBuilder};
use crate::vmm::devices::virtio::mmio::{MmioError, MmioTransport};

/// Errors attaching a share to a VM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AttachError {
    /// {0}
    Fs(#[from] FsError),
    /// virtio-fs transport: {0}
    Transport(#[from] MmioError),
    /// cannot duplicate the virtio-fs eventfds: {0}
    EventFd(#[source] io::Error),
    /// placing the virtio-fs device: {0}
    Build(#[from] BuildError),
}

/// A virtio-fs device and its transport.
///
/// Keep it for the VM's lifetime: dropping the last reference to `device` stops virtiofsd.
/// The VMM event loop polls [`VirtioFs::event_sources`] and calls [`VirtioFs::process`]
/// on `device`.
pub struct FsDevice {
    pub device: Arc<Mutex<VirtioFs>>,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl FsDevice {
    /// The interrupt eventfd, for KVM_IRQFD on the device's IRQ.
    pub fn irq_evt(&self) -> io::Result<EventFd> {
        self.transport
            .lock()
            .expect("virtio-fs transport lock poisoned")
            .interrupt()
            .irq_evt()
            .try_clone()
    }

    /// The queue notify eventfds, for KVM_IOEVENTFD on QueueNotify (datamatch = index).
    pub fn queue_notify(&self) -> io::Result<Vec<EventFd>> {
        self.transport
            .lock()
            .expect("virtio-fs transport lock poisoned")
            .queue_notify_eventfds()
    }
}

/// Starts virtiofsd for `config` and wraps the device in a virtio-mmio transport over
/// `mem` (which must be the VMM's memfd-backed guest memory).
pub fn create_fs_device(mem: &GuestMemoryMmap, config: &FsConfig) -> Result<FsDevice, AttachError> {
    let device = Arc::new(Mutex::new(VirtioFs::new(config)?));
    let transport = MmioTransport::new(mem.clone(), device.clone())?;
    Ok(FsDevice {
        device,
        transport: Arc::new(Mutex::new(transport)),
    })
}

/// [`create_fs_device`], then places it on `builder`'s MMIO bus with its irqfd and
/// ioeventfds; the builder announces it on the kernel command line.
pub fn attach_fs_device(
    builder: &mut VmBuilder,
    config: &FsConfig,
) -> Result<(FsDevice, MmioSlot), AttachError> {
    let fs = create_fs_device(builder.memory(), config)?;
    let irq = fs.irq_evt().map_err(AttachError::EventFd)?;
    let notify = fs.queue_notify().map_err(AttachError::EventFd)?;
    let slot = builder.add_mmio_device(fs.transport.clone(), &irq, &notify)?;
    Ok((fs, slot))
}
