//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod trigger;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
