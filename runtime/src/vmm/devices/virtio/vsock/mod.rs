//! virtio-vsock (virtio 1.2, 5.10) with a user-space host side over Unix sockets.
//!
//! - [`packet`]: the wire format.
//! - [`connection`]: one stream's state machine and credit accounting.
//! - [`unix`]: the host side, a muxer over Unix sockets ("hybrid vsock").
//! - [`device`]: the virtio device: queues, config space, moving packets between the
//!   queues and the muxer.
//! - [`event_handler`]: what the VMM event loop polls and calls.

mod connection;
pub mod device;
pub mod event_handler;
pub mod packet;
mod txbuf;
pub mod unix;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockConfig, VsockError};
pub use event_handler::VsockEvent;

/// The host's CID (VMADDR_CID_HOST): the only peer the guest can reach.
pub const HOST_CID: u64 = 2;
/// The guest's CID when the configuration does not say.
pub const DEFAULT_GUEST_CID: u64 = 3;
