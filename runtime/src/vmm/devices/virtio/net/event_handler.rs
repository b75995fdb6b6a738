//! The net device as the VMM event loop sees it: a fixed set of fds to poll for
//! readability (level-triggered), and one entry point per fd.

use std::os::fd::{AsRawFd, RawFd};

use super::device::{Net, NetError, RXQ, TXQ};
use crate::vmm::devices::virtio::VirtioDevice;

/// What a ready fd means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// The driver added RX buffers.
    RxQueue,
    /// The driver added TX frames.
    TxQueue,
    /// The tap has frames for the guest (an epoll fd that holds the tap; it goes quiet
    /// while the guest has no buffers, so polling it never spins).
    Tap,
}

impl Net {
    /// The fds to poll for EPOLLIN, valid for the device's lifetime (before activation
    /// and across resets too), with the event each one stands for.
    pub fn event_sources(&self) -> [(RawFd, NetEvent); 3] {
        let q = self.queue_events();
        [
            (q[RXQ].as_raw_fd(), NetEvent::RxQueue),
            (q[TXQ].as_raw_fd(), NetEvent::TxQueue),
            (self.tap_epoll.as_raw_fd(), NetEvent::Tap),
        ]
    }

    /// Handles one ready fd. Errors are the VMM's to log; the device stays usable.
    pub fn process(&mut self, event: NetEvent) -> Result<(), NetError> {
        let index = match event {
            NetEvent::RxQueue => Some(RXQ),
            NetEvent::TxQueue => Some(TXQ),
            NetEvent::Tap => None,
        };
        if let Some(i) = index {
            // Consume the notification, or a level-triggered loop would spin on it.
            if let Err(e) = self.queue_events()[i].read() {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(NetError::EventFd(e));
                }
            }
        }
        match event {
            NetEvent::RxQueue | NetEvent::Tap => self.process_rx(),
            NetEvent::TxQueue => self.process_tx(),
        }
    }
}
