//! virtio-fs: the guest mounts a host directory (the sandbox's share, holding each
//! container's rootfs) through FUSE over virtqueues, served by virtiofsd.
//!
//! The VMM is a vhost-user frontend: it keeps the transport, config space and interrupt,
//! and hands virtiofsd the guest memory (a shared memfd) and the rings.
//!
//! - [`virtiofsd`]: starting, watching and stopping the virtiofsd process.
//! - [`frontend`]: the vhost-user messages.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice).
//! - [`event_handler`]: what the VMM event loop polls and calls.
//! - [`attach`]: putting a share on a VM being built.

pub mod attach;
pub mod device;
pub mod event_handler;
pub mod frontend;
pub mod virtiofsd;

#[cfg(test)]
mod tests;

pub use attach::{attach_fs_device, create_fs_device, FsDevice};
pub use device::{FsConfig, FsError, VirtioFs, DEFAULT_REPLY_TIMEOUT};
pub use event_handler::FsEvent;
pub use virtiofsd::{CacheMode, Virtiofsd, VirtiofsdConfig, VirtiofsdError};
