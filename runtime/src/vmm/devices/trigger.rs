//! An `EventFd` as a vm-superio interrupt/reset trigger.
//!
//! Registered with KVM as an irqfd, writing the eventfd raises the guest interrupt
//! without leaving the kernel; as a reset line the event loop polls it.

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Newtype so the foreign `Trigger` trait can be implemented for the foreign `EventFd`.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// A non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        EventFd::new(libc::EFD_NONBLOCK).map(Self)
    }

    /// Another handle on the same eventfd (for KVM or the event loop).
    pub fn try_clone_fd(&self) -> std::io::Result<EventFd> {
        self.0.try_clone()
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
