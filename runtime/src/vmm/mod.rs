//! The virtual machine monitor: one KVM microVM per sandbox.
//!
//! [`VmConfig`] -> [`VmBuilder::new`] (KVM, memfd RAM, COM1, i8042, boot timer) ->
//! [`VmBuilder::add_mmio_device`] for each virtio device -> [`VmBuilder::start`] (kernel,
//! initramfs, command line, boot_params, MP table, vCPU threads) -> [`Vm::wait`].
//!
//! ```no_run
//! use husk::vmm::{BootSource, RunOptions, VmBuilder, VmConfig};
//! # fn device() -> (husk::vmm::devices::SharedDevice, vmm_sys_util::eventfd::EventFd, Vec<vmm_sys_util::eventfd::EventFd>) { unimplemented!() }
//! let mut config = VmConfig::new(BootSource::Linux {
//!     kernel: "vmlinux".into(),
//!     initrd: Some("initramfs.cpio".into()),
//!     cmdline_extra: String::new(),
//! });
//! config.vcpus = 2;
//! let mut builder = VmBuilder::new(config)?;
//! // A virtio-mmio transport: irqfd on the slot's IRQ, ioeventfd per queue on
//! // QueueNotify, `virtio_mmio.device=4K@0xd0000000:5` on the command line.
//! let (transport, interrupt, queue_notify) = device();
//! let slot = builder.add_mmio_device(transport, &interrupt, &queue_notify)?;
//! let mut vm = builder.start()?;
//! let outcome = vm.wait(RunOptions { until_ready: true, ready_timeout: None })?;
//! # let _ = (slot, outcome);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod boot;
pub mod builder;
pub mod config;
pub mod device_set;
pub mod devices;
pub mod entropy;
pub mod event_loop;
pub mod guest;
pub mod kvm;
pub mod memory;
pub mod snapshot;
pub mod template;
pub mod vcpu;
pub mod vm;

pub use boot::regs::CpuMode;
pub use builder::{BuildError, MmioSlot, VmBuilder};
pub use config::{BootSource, VmConfig};
pub use devices::serial::{ConsoleOutput, SharedBuffer};
pub use vm::{GuestExit, RunError, RunOptions, Vm, VmOutcome, VmPauseHandle, VmStopHandle};
