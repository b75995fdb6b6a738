//! Hands out the ports the agent listens on for process streams.

use std::sync::atomic::{AtomicU32, Ordering};

use husk_protocol::CONTROL_PORT;

/// Ports above the control port, never reused during the agent's life: a late host
/// connection can then never reach the wrong process's stream.
pub struct PortAllocator {
    next: AtomicU32,
}

impl Default for PortAllocator {
    fn default() -> Self {
        Self {
            next: AtomicU32::new(CONTROL_PORT + 1),
        }
    }
}

impl PortAllocator {
    pub fn next(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}
