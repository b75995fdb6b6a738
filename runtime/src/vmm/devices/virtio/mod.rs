//! Virtio devices and their MMIO transport (virtio 1.2, non-legacy only).
//!
//! A device model implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on the MMIO
//! bus and runs the driver's side of the handshake (status, features, queue setup). Once the
//! driver sets DRIVER_OK the transport hands the configured queues to the device, which from
//! then on is driven by the VMM event loop (queue notification eventfds) and raises
//! interrupts through [`Interrupt`].

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;
pub use mmio::MmioTransport;

/// Device status bits (virtio 1.2, 2.1), written by the driver to the Status register.
pub mod status {
    use virtio_bindings::virtio_config as c;

    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bits common to all devices, as masks.
pub mod features {
    use virtio_bindings::virtio_config as c;

    /// The device follows virtio 1.x; every device here offers it, and refuses drivers that
    /// do not accept it (there is no legacy interface).
    pub const VERSION_1: u64 = 1 << c::VIRTIO_F_VERSION_1;
}

/// Device type ids (virtio 1.2, 5).
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;

    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
    pub const FS: u32 = ids::VIRTIO_ID_FS;
}

/// Errors a device reports when the driver sets DRIVER_OK.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ActivateError {
    /// the device needs {expected} queues, the transport has {got}
    QueueCount { expected: usize, got: usize },
    /// the device is already active
    AlreadyActive,
    /// cannot signal or clone an eventfd: {0}
    EventFd(#[source] std::io::Error),
    /// {0}
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ActivateError {
    /// The checks every device makes on DRIVER_OK: not active yet, and the transport
    /// hands over as many queues as the device has.
    pub fn check(already_active: bool, expected: usize, got: usize) -> Result<(), Self> {
        if already_active {
            return Err(ActivateError::AlreadyActive);
        }
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        Ok(())
    }
}

/// What a device works with from DRIVER_OK until reset: guest memory, the interrupt it
/// raises and its queues (in queue index order), as [`VirtioDevice::activate`] got them.
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<Queue>,
}

impl ActiveQueues {
    /// The activation of a device driven by its queues: the checks of
    /// [`ActivateError::check`] against `slot` and `expected` queues, then `slot` holds
    /// what the device works with.
    pub fn activate(
        slot: &mut Option<Self>,
        expected: usize,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActivateError::check(slot.is_some(), expected, queues.len())?;
        *slot = Some(Self {
            mem,
            interrupt,
            queues,
        });
        Ok(())
    }
}

/// Reads `data.len()` bytes of a device's config space at `offset`; bytes past its end
/// read as zero (virtio 1.2, 4.2.2.1: the driver may read any width within the space).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A device model behind a virtio transport.
///
/// The trait holds only what a transport needs; the device's data path (what it does with
/// its queues) is its own business and runs on the VMM event loop.
pub trait VirtioDevice: Send {
    /// The virtio device type id ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One eventfd per queue, signalled when the driver notifies that queue. The VMM
    /// registers them as ioeventfds and polls them; the transport signals them for
    /// notifications that reach it as MMIO writes.
    fn queue_events(&self) -> &[EventFd];

    /// Features the device offers, [`features::VERSION_1`] included.
    fn avail_features(&self) -> u64;

    /// The driver accepted `features` (a subset of [`Self::avail_features`]), at FEATURES_OK.
    fn ack_features(&mut self, features: u64);

    /// Reads the device configuration space at `offset`. Bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset`. Writes to read-only or unknown
    /// fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK with every queue valid: start working on `queues` (in queue
    /// index order), raising interrupts through `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// The driver reset the device: drop the queues and return to the state before
    /// activation, so that the driver can set it up again.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_zero_past_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_space(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_space(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_space(&config, u64::MAX, &mut data[..1]);
        assert_eq!(data[0], 0);
    }

    #[test]
    fn activation_checks_state_then_queue_count() {
        assert!(matches!(
            ActivateError::check(true, 2, 2),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(matches!(
            ActivateError::check(false, 3, 2),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        assert!(ActivateError::check(false, 2, 2).is_ok());
    }
}
