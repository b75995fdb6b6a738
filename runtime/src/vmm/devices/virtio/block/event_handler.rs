//! The block device as the VMM event loop sees it: one queue eventfd to poll.

use std::os::fd::{AsRawFd, RawFd};

use super::device::{Block, BlockError, REQUESTQ};
use crate::vmm::devices::virtio::VirtioDevice;

/// What a ready fd means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEvent {
    /// The driver added requests.
    Queue,
}

impl Block {
    /// The fds to poll for EPOLLIN, valid for the device's lifetime.
    pub fn event_sources(&self) -> [(RawFd, BlockEvent); 1] {
        [(self.queue_events()[REQUESTQ].as_raw_fd(), BlockEvent::Queue)]
    }

    /// Handles one ready fd. Errors are the VMM's to log; the device stays usable.
    pub fn process(&mut self, event: BlockEvent) -> Result<(), BlockError> {
        match event {
            BlockEvent::Queue => {
                // Consume the notification, or a level-triggered loop would spin on it.
                if let Err(e) = self.queue_events()[REQUESTQ].read() {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        return Err(BlockError::EventFd(e));
                    }
                }
                self.process_queue()
            }
        }
    }
}
