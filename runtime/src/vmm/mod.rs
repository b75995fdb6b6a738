//! The virtual machine monitor: one KVM microVM per sandbox.
//!
//! [`VmConfig`] -> [`VmBuilder`] (add virtio devices with
//! [`VmBuilder::add_mmio_device`]) -> [`VmBuilder::start`] -> [`Vm::wait`].

pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub use boot::regs::CpuMode;
pub use builder::{BuildError, MmioSlot, VmBuilder};
pub use config::{BootSource, VmConfig};
pub use devices::serial::{ConsoleOutput, SharedBuffer};
pub use vm::{GuestExit, RunError, RunOptions, Vm, VmOutcome};
