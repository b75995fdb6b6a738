//! What the VMM event loop watches for a virtio-fs device.
//!
//! virtiofsd signals a per-queue "call" eventfd when it used buffers. With virtio-mmio the
//! interrupt alone is not enough: the guest's handler reads InterruptStatus and ignores
//! the interrupt unless the used-buffer bit is set, and only the transport can set it.
//! So the call eventfds are not handed to KVM as irqfds; the event loop relays them
//! through [`Interrupt::signal_used_buffer`](crate::vmm::devices::virtio::Interrupt),
//! which sets the bit and then signals the irqfd. That costs one VMM-thread wakeup per
//! batch of used buffers (virtiofsd signals once per batch, less with EVENT_IDX), small
//! next to a FUSE request's cost in the guest. Requests go the other way without the VMM:
//! the queue notify eventfds are KVM ioeventfds that virtiofsd polls directly.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::device::{FsError, VirtioFs};

/// What a ready fd means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsEvent {
    /// virtiofsd used buffers of this queue.
    Used(usize),
    /// virtiofsd exited (its pidfd is readable).
    BackendExit,
}

impl VirtioFs {
    /// The fds to poll for EPOLLIN, valid for the device's lifetime (before activation
    /// and across resets too). The queue notify eventfds are not among them: they are
    /// virtiofsd's to read.
    pub fn event_sources(&self) -> Vec<(RawFd, FsEvent)> {
        let mut sources: Vec<_> = self
            .call_events
            .iter()
            .enumerate()
            .map(|(i, evt)| (evt.as_raw_fd(), FsEvent::Used(i)))
            .collect();
        if let Some(daemon) = &self.backend {
            sources.push((daemon.pidfd(), FsEvent::BackendExit));
        }
        sources
    }

    /// Handles one ready fd. `Err` for [`FsEvent::BackendExit`] means virtiofsd is gone
    /// (the error quotes its exit status and stderr): the guest's file system is dead, so
    /// the VMM should stop the VM. The pidfd stays readable: stop polling it.
    pub fn process(&mut self, event: FsEvent) -> Result<(), FsError> {
        match event {
            FsEvent::Used(index) => {
                let Some(evt) = self.call_events.get(index) else {
                    return Ok(());
                };
                match evt.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(FsError::EventFd(e)),
                }
                match &self.active {
                    Some(active) => active
                        .interrupt
                        .signal_used_buffer()
                        .map_err(FsError::Interrupt),
                    // A signal from rings the driver has reset: nobody to tell.
                    None => Ok(()),
                }
            }
            FsEvent::BackendExit => match self.backend.as_mut() {
                Some(daemon) => Ok(daemon.check_alive()?),
                None => Ok(()),
            },
        }
    }
}
