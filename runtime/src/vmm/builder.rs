//! Turning a [`VmConfig`] into a running [`Vm`], one small step at a time:
//! KVM and the VM, guest memory, legacy devices, virtio-mmio devices (added by the caller
//! through [`VmBuilder::add_mmio_device`]), then the boot source and the vCPUs.

use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::boot::cmdline::KernelArgs;
use super::boot::cpu_template::CpuTemplate;
use super::boot::kernel_notes::KernelSupport;
use super::boot::{self, cmdline, cpuid, msrs, regs, BootEntry, BootError};
use super::config::{BootSource, VmConfig};
use super::device_set::{DeviceSet, DeviceSetError};
use super::devices::boot_timer::{BootTimer, ReadyTime, BOOT_TIMER_LEN, BOOT_TIMER_PORT};
use super::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use super::devices::serial::{SerialDevice, COM1_IRQ, COM1_LEN, COM1_PORT};
use super::devices::trigger::EventFdTrigger;
use super::devices::{Bus, BusError, SharedDevice};
use super::kvm::{self, KvmError};
use super::memory::{self, MemoryError, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use super::snapshot::{LoadedSnapshot, SnapshotError};
use super::vcpu::{Vcpu, VcpuError};
use super::vm::{PauseChannel, Vm, VmParts};
use crate::host::HostMode;

/// Errors building a VM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BuildError {
    /// {0}
    Kvm(#[from] KvmError),
    /// {0}
    Memory(#[from] MemoryError),
    /// {0}
    Boot(#[from] BootError),
    /// {0}
    Cpuid(#[from] cpuid::CpuidError),
    /// {0}
    Msrs(#[from] msrs::MsrError),
    /// {0}
    Vcpu(#[from] VcpuError),
    /// vCPU {index}: {source}
    VcpuRegs { index: u8, source: regs::RegsError },
    /// a VM needs between 1 and {max} vCPUs, not {given}; fix --vcpus
    VcpuCount { given: u8, max: u8 },
    /// placing a device on the bus failed: {0}
    Bus(#[from] BusError),
    /// creating an eventfd failed: {0}
    EventFd(std::io::Error),
    /// opening the console output failed: {0}
    Console(std::io::Error),
    /// registering {what} with KVM failed: {source}
    Register {
        what: String,
        source: kvm_ioctls::Error,
    },
    /// no interrupt left for another virtio-mmio device (IRQs 5-23 are taken)
    OutOfIrqs,
    /// {0}
    Devices(#[from] DeviceSetError),
    /// snapshot: {0}
    Snapshot(#[from] SnapshotError),
}

/// virtio-mmio devices get IOAPIC pins from 5 up (0-4 are the PIT, keyboard, cascade,
/// COM2 and COM1).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
pub const LAST_VIRTIO_IRQ: u32 = 23;
/// The queue-notify register of the virtio-mmio transport (offset from its base).
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Where a virtio-mmio device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The n-th virtio-mmio slot.
pub fn mmio_slot(n: u32) -> Result<MmioSlot, BuildError> {
    let irq = FIRST_VIRTIO_IRQ + n;
    if irq > LAST_VIRTIO_IRQ {
        return Err(BuildError::OutOfIrqs);
    }
    Ok(MmioSlot {
        base: VIRTIO_MMIO_START + u64::from(n) * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq,
    })
}

/// Legacy devices' handles the running VM keeps.
pub(super) struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub reset_evt: EventFd,
    pub ready_evt: EventFd,
    pub ready_time: ReadyTime,
}

/// A VM being assembled. Devices can be added until [`VmBuilder::start`].
pub struct VmBuilder {
    start: Instant,
    vcpus: u8,
    cpu_template: CpuTemplate,
    boot: BootSource,
    host_mode: HostMode,
    console_input: bool,
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    legacy: LegacyDevices,
    mmio_slots: Vec<MmioSlot>,
    /// Where a Linux guest's root comes from (initramfs or root disk).
    guest_root: boot::GuestRoot,
    /// The devices `VmConfig::devices` asked for, driven by the VM's event loop.
    devices: DeviceSet,
    /// Set by [`VmBuilder::restore`]: `start` restores this instead of booting.
    restoring: Option<Box<LoadedSnapshot>>,
}

/// Restoring from a snapshot: `VmBuilder::restore` and what `start` calls.
#[path = "snapshot/builder_hooks.rs"]
mod snapshot_hooks;

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

impl VmBuilder {
    /// Creates the VM, its memory and the legacy devices. Time to ready counts from here.
    pub fn new(config: VmConfig) -> Result<Self, BuildError> {
        Self::with_memory(config, None)
    }

    /// `new`, with RAM (and the state to restore) from a snapshot when given.
    fn with_memory(
        config: VmConfig,
        snapshot: Option<(GuestMemoryMmap, Box<LoadedSnapshot>)>,
    ) -> Result<Self, BuildError> {
        let start = Instant::now();
        if config.vcpus == 0 || config.vcpus > boot::mptable::MAX_VCPUS {
            return Err(BuildError::VcpuCount {
                given: config.vcpus,
                max: boot::mptable::MAX_VCPUS,
            });
        }
        let kvm = kvm::open_kvm(config.vcpus)?;
        let vm = kvm::create_vm(&kvm)?;
        let (mem, restoring) = match snapshot {
            Some((mem, loaded)) => (mem, Some(loaded)),
            None => (memory::create_guest_memory(config.mem_mib)?, None),
        };
        kvm::register_memory(&vm, &mem)?;
        let mut pio = Bus::new();
        let legacy = add_legacy_devices(&vm, &mut pio, config.console, start)?;
        let guest_root = match &config.boot {
            BootSource::Linux { initrd, .. } => boot::GuestRoot::of(initrd.as_deref())?,
            BootSource::Raw { .. } => boot::GuestRoot::Builtin,
        };
        let mut builder = Self {
            start,
            vcpus: config.vcpus,
            cpu_template: config.cpu_template,
            boot: config.boot,
            host_mode: config.host_mode,
            console_input: config.console_input,
            kvm,
            vm,
            mem,
            pio,
            mmio: Bus::new(),
            legacy,
            mmio_slots: Vec::new(),
            guest_root,
            restoring,
            devices: DeviceSet::default(),
        };
        let root_disk = builder.guest_root.disk().map(Path::to_path_buf);
        builder.devices = DeviceSet::create(&mut builder, &config.devices, root_disk.as_deref())?;
        Ok(builder)
    }

    /// Guest memory, for devices that need it (virtio queues live there).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The VM fd, for devices that register more eventfds themselves.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Places a virtio-mmio transport in the next 4 KiB slot: `interrupt` becomes an
    /// irqfd on the slot's IRQ, `queue_notify[i]` an ioeventfd on the QueueNotify
    /// register matching the value `i`, and the kernel command line gets
    /// `virtio_mmio.device=4K@base:irq`.
    pub fn add_mmio_device(
        &mut self,
        device: SharedDevice,
        interrupt: &EventFd,
        queue_notify: &[EventFd],
    ) -> Result<MmioSlot, BuildError> {
        let slot = mmio_slot(self.mmio_slots.len() as u32)?;
        self.vm
            .register_irqfd(interrupt, slot.irq)
            .map_err(|source| BuildError::Register {
                what: format!("irqfd for IRQ {}", slot.irq),
                source,
            })?;
        let notify_addr = IoEventAddress::Mmio(slot.base + VIRTIO_MMIO_QUEUE_NOTIFY);
        for (queue, evt) in queue_notify.iter().enumerate() {
            self.vm
                .register_ioevent(evt, &notify_addr, queue as u32)
                .map_err(|source| BuildError::Register {
                    what: format!("ioeventfd for queue {queue}"),
                    source,
                })?;
        }
        self.mmio.insert(device, slot.base, slot.size)?;
        self.mmio_slots.push(slot);
        Ok(slot)
    }

    /// The kernel arguments this VM will boot with (Linux boot only): the command line
    /// and init's environment, as far as the kernel reads that outside the line.
    pub fn kernel_args(&self) -> Result<KernelArgs, BuildError> {
        let support = match &self.boot {
            BootSource::Linux { kernel, .. } => boot::kernel_notes::kernel_support(kernel),
            BootSource::Raw { .. } => KernelSupport::default(),
        };
        let mut args = cmdline::base_args(self.host_mode, support).map_err(BootError::from)?;
        let line = &mut args.cmdline;
        for slot in &self.mmio_slots {
            line.add_virtio_mmio_device(slot.size, GuestAddress(slot.base), slot.irq, None)
                .map_err(|e| BootError::from(cmdline::CmdlineError::Invalid(e)))?;
        }
        if self.guest_root.disk().is_some() {
            cmdline::append(line, boot::ROOT_DISK_CMDLINE).map_err(BootError::from)?;
        }
        if let BootSource::Linux { cmdline_extra, .. } = &self.boot {
            cmdline::append_extra(&mut args, cmdline_extra, support).map_err(BootError::from)?;
        }
        Ok(args)
    }

    fn load_boot_source(&self, supported_cpuid: &CpuId) -> Result<BootEntry, BuildError> {
        Ok(match &self.boot {
            BootSource::Linux { kernel, .. } => {
                let args = self.kernel_args()?;
                log::info!(
                    "kernel command line: {}; init environment: {:?}",
                    args.cmdline
                        .as_cstring()
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    args.init_env
                );
                let initramfs = self.guest_root.initramfs();
                let device_irqs: Vec<u32> = self.mmio_slots.iter().map(|s| s.irq).collect();
                let platform = cpuid::guest_platform(
                    supported_cpuid,
                    self.vcpus,
                    self.cpu_template,
                    self.host_mode,
                )?;
                boot::load_linux(
                    &self.mem,
                    kernel,
                    initramfs,
                    &args,
                    self.vcpus,
                    &device_irqs,
                    !platform.no_legacy_pic,
                )?
            }
            BootSource::Raw {
                code,
                load_addr,
                entry,
                mode,
            } => boot::load_raw(&self.mem, code, *load_addr, *entry, *mode, self.vcpus)?,
        })
    }

    fn create_vcpus(
        &self,
        entry: BootEntry,
        supported_cpuid: &CpuId,
    ) -> Result<Vec<kvm_ioctls::VcpuFd>, BuildError> {
        let supported_msrs = msrs::supported_msrs(&self.kvm)?;
        (0..self.vcpus)
            .map(|index| {
                let fd = self.vm.create_vcpu(u64::from(index)).map_err(|source| {
                    BuildError::VcpuRegs {
                        index,
                        source: regs::RegsError::Ioctl {
                            what: "KVM_CREATE_VCPU",
                            source,
                        },
                    }
                })?;
                let vcpu_cpuid = cpuid::vcpu_cpuid(
                    supported_cpuid,
                    index,
                    self.vcpus,
                    self.cpu_template,
                    self.host_mode,
                )?;
                fd.set_cpuid2(&vcpu_cpuid)
                    .map_err(|source| cpuid::CpuidError::Set { index, source })?;
                msrs::setup_msrs(&fd, &supported_msrs)?;
                regs::setup_fpu_and_lapic(&fd)
                    .map_err(|source| BuildError::VcpuRegs { index, source })?;
                // Other vCPUs wait for the boot CPU's INIT/SIPI in the in-kernel LAPIC.
                if index == 0 {
                    regs::setup_boot_vcpu(&fd, entry.mode, entry.entry, entry.zero_page)
                        .map_err(|source| BuildError::VcpuRegs { index, source })?;
                }
                Ok(fd)
            })
            .collect()
    }

    /// Loads the boot source, creates the vCPUs and starts them.
    pub fn start(mut self) -> Result<Vm, BuildError> {
        let fingerprint = self.fingerprint()?;
        let fds = match self.restoring.take() {
            Some(snapshot) => self.restore_vcpus(&snapshot, fingerprint)?,
            None => {
                // The MP table (boot source) and the vCPUs follow from the same CPUID.
                let supported_cpuid = cpuid::supported_cpuid(&self.kvm)?;
                let entry = self.load_boot_source(&supported_cpuid)?;
                self.create_vcpus(entry, &supported_cpuid)?
            }
        };
        let pio = Arc::new(self.pio);
        let mmio = Arc::new(self.mmio);
        let stop_evt = eventfd()?;
        let (stop_tx, stop_rx) = channel();
        let mut handles = Vec::with_capacity(fds.len());
        for (index, fd) in fds.into_iter().enumerate() {
            let vcpu = Vcpu {
                index: index as u8,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: self.mem.clone(),
                stops: stop_tx.clone(),
                stop_evt: stop_evt.try_clone().map_err(BuildError::EventFd)?,
            };
            handles.push(vcpu.spawn()?);
        }
        Ok(Vm::new(VmParts {
            start: self.start,
            vm: self.vm,
            mem: self.mem,
            vcpus: handles,
            stops: stop_rx,
            stop_evt,
            legacy: self.legacy,
            console_input: self.console_input,
            mmio_slots: self.mmio_slots,
            fingerprint,
            devices: self.devices,
            host_stop: eventfd()?,
            pause: PauseChannel::new().map_err(BuildError::EventFd)?,
            ready_notify: None,
        }))
    }
}

/// COM1 (irqfd on IRQ 4), the i8042 reset line and the boot timer on the port bus.
fn add_legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    console: super::devices::serial::ConsoleOutput,
    start: Instant,
) -> Result<LegacyDevices, BuildError> {
    let serial_irq = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq.0, COM1_IRQ)
        .map_err(|source| BuildError::Register {
            what: format!("irqfd for the serial port on IRQ {COM1_IRQ}"),
            source,
        })?;
    let out = console.into_writer().map_err(BuildError::Console)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
    pio.insert(serial.clone(), COM1_PORT, COM1_LEN)?;

    let reset = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    let reset_evt = reset.try_clone_fd().map_err(BuildError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset))),
        I8042_PORT,
        I8042_LEN,
    )?;

    let ready_evt = eventfd()?;
    let timer = BootTimer::new(start, ready_evt.try_clone().map_err(BuildError::EventFd)?);
    let ready_time = timer.ready_time();
    pio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, BOOT_TIMER_LEN)?;
    Ok(LegacyDevices {
        serial,
        reset_evt,
        ready_evt,
        ready_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_slots_are_4k_apart_from_the_hole_with_irqs_from_5() {
        assert_eq!(
            mmio_slot(0).unwrap(),
            MmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5
            }
        );
        assert_eq!(
            mmio_slot(2).unwrap(),
            MmioSlot {
                base: 0xd000_2000,
                size: 0x1000,
                irq: 7
            }
        );
        assert_eq!(mmio_slot(18).unwrap().irq, 23);
        assert!(matches!(mmio_slot(19), Err(BuildError::OutOfIrqs)));
    }
}
