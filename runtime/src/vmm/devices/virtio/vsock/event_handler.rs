//! The vsock device as the VMM event loop sees it: a fixed set of fds to poll for
//! readability, and one entry point per fd.

use std::os::fd::{AsRawFd, RawFd};

use super::device::{Vsock, VsockError, EVQ, RXQ, TXQ};

/// What a ready fd means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockEvent {
    /// The driver added RX buffers.
    RxQueue,
    /// The driver added TX packets.
    TxQueue,
    /// The driver added event buffers (no events are sent yet).
    EvQueue,
    /// A host socket is ready (the muxer's nested epoll fd).
    Backend,
}

impl Vsock {
    /// The fds to poll for EPOLLIN, valid for the device's lifetime (also before
    /// activation and across resets), with the event each one stands for.
    pub fn event_sources(&self) -> [(RawFd, VsockEvent); 4] {
        use crate::vmm::devices::virtio::VirtioDevice;
        let q = self.queue_events();
        [
            (q[RXQ].as_raw_fd(), VsockEvent::RxQueue),
            (q[TXQ].as_raw_fd(), VsockEvent::TxQueue),
            (q[EVQ].as_raw_fd(), VsockEvent::EvQueue),
            (self.muxer.epoll_fd(), VsockEvent::Backend),
        ]
    }

    /// Handles one ready fd. Errors are the VMM's to log; the device stays usable.
    pub fn process(&mut self, event: VsockEvent) -> Result<(), VsockError> {
        use crate::vmm::devices::virtio::VirtioDevice;
        let index = match event {
            VsockEvent::RxQueue => Some(RXQ),
            VsockEvent::TxQueue => Some(TXQ),
            VsockEvent::EvQueue => Some(EVQ),
            VsockEvent::Backend => None,
        };
        if let Some(i) = index {
            // Consume the notification, or a level-triggered loop would spin on it.
            if let Err(e) = self.queue_events()[i].read() {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(VsockError::EventFd(e));
                }
            }
        }
        match event {
            VsockEvent::RxQueue => {
                self.process_rx()?;
                // TX may have stopped waiting for RX room.
                self.process_tx()?;
                self.process_rx()
            }
            VsockEvent::TxQueue => {
                self.process_tx()?;
                self.process_rx()
            }
            VsockEvent::EvQueue => Ok(()),
            VsockEvent::Backend => {
                self.muxer.process_events();
                self.process_rx()
            }
        }
    }
}
