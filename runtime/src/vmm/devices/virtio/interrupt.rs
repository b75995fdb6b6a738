//! The interrupt line of one virtio-mmio device.
//!
//! virtio-mmio has one interrupt per device; the InterruptStatus register tells the driver
//! why it fired. The device sets a reason bit and signals the eventfd, which the VMM
//! registers with KVM as an irqfd for the device's GSI, so no VMM thread sits in the path.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Reasons for an interrupt, as bits of the InterruptStatus register.
pub mod reason {
    use super::virtio_mmio;

    /// The device used buffers of at least one queue.
    pub const USED_BUFFER: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
    /// The device configuration (or DEVICE_NEEDS_RESET) changed.
    pub const CONFIG_CHANGE: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
}

/// Interrupt status bits plus the eventfd that injects the interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irq_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as the device's irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the `bits` it has handled (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Tells the driver the device used buffers.
    pub fn signal_used_buffer(&self) -> io::Result<()> {
        self.raise(reason::USED_BUFFER)
    }

    /// Tells the driver the configuration (or the device status) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(reason::CONFIG_CHANGE)
    }

    /// Clears all reasons (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bits: u32) -> io::Result<()> {
        // Set the bit before signalling, so the driver's handler finds the reason when it
        // reads InterruptStatus.
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_sets_bits_and_signals_ack_clears_only_given_bits() {
        let irq = Interrupt::new().unwrap();
        assert!(
            irq.irq_evt().read().is_err(),
            "no interrupt before any signal"
        );
        irq.signal_used_buffer().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), reason::USED_BUFFER | reason::CONFIG_CHANGE);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(reason::USED_BUFFER);
        assert_eq!(irq.status(), reason::CONFIG_CHANGE);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }
}
