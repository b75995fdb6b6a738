//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2), on the VMM's MMIO bus.
//!
//! The transport owns what the driver configures before DRIVER_OK (status, features, queue
//! sizes and addresses) and enforces the order of the driver initialization sequence
//! (3.1.1). At DRIVER_OK it hands copies of the queues to the device model.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use Half::{High, Low};

use super::{features, status, ActivateError, Interrupt, VirtioDevice};
use crate::vmm::devices::BusDevice;
use crate::vmm::snapshot::devices::{MmioTransportSnapshot, QueueSnapshot};

/// "virt" in little endian, the value of the MagicValue register.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Only the non-legacy interface is implemented.
pub const MMIO_VERSION: u32 = 2;
/// "husk" in little endian, the value of the VendorID register.
pub const VENDOR_ID: u32 = 0x6b73_7568;
/// Size of the MMIO window of one device: registers, then config space at 0x100.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify: the VMM registers each queue's eventfd as a KVM ioeventfd at
/// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MmioError {
    /// cannot create the interrupt eventfd: {0}
    Interrupt(#[source] io::Error),
    /// queue {index} has an invalid maximum size {size}
    QueueMaxSize { index: usize, size: u16 },
    /// the device has {queues} queues but {events} notification eventfds
    QueueEvents { queues: usize, events: usize },
}

/// Why DRIVER_OK could not activate the device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum DriverOkError {
    /// queue {0} is not ready, or its size or rings are invalid
    QueueNotValid(usize),
    /// the device refused to activate: {0}
    Device(#[from] ActivateError),
}

/// A queue as the driver configured it. Values are kept as written and checked only at
/// DRIVER_OK, since the driver may write an address in two halves, in any order.
struct QueueSlot {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueSlot {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// A `virtio_queue::Queue` with this configuration, if the configuration is valid for
    /// `mem` (sizes are powers of two up to the maximum, rings aligned and inside memory).
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(u16::try_from(self.size).ok()?).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_ready(self.ready);
        q.set_event_idx(event_idx);
        q.is_valid(mem).then_some(q)
    }
}

/// Which part of a 64-bit queue address a register holds.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

fn set_half(addr: &mut u64, half: Half, value: u32) {
    *addr = match half {
        Half::Low => (*addr & !0xffff_ffff) | u64::from(value),
        Half::High => (*addr & 0xffff_ffff) | (u64::from(value) << 32),
    };
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueSlot>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver wrote a feature bit beyond the 64 this transport knows.
    driver_features_out_of_range: bool,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Set by [`MmioTransport::defer_activation`]: DRIVER_OK only records the request and
    /// signals this eventfd; the VMM event loop then calls
    /// [`MmioTransport::activate_pending`].
    deferred: Option<EventFd>,
    /// DRIVER_OK was set and the deferred activation has not run yet.
    activation_pending: bool,
}

/// activating virtio device type {device_type} failed (the transport set DEVICE_NEEDS_RESET): {reason}
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub struct ActivationFailed {
    pub device_type: u32,
    reason: String,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let interrupt = Arc::new(Interrupt::new().map_err(MmioError::Interrupt)?);
        let queues = {
            let dev = device.lock().expect("virtio device lock poisoned");
            let sizes = dev.queue_max_sizes();
            if sizes.len() != dev.queue_events().len() {
                return Err(MmioError::QueueEvents {
                    queues: sizes.len(),
                    events: dev.queue_events().len(),
                });
            }
            sizes
                .iter()
                .enumerate()
                .map(|(index, &size)| {
                    // Checked here so a bad device model fails at VM build, not at boot.
                    Queue::new(size)
                        .map(|_| QueueSlot::new(size))
                        .map_err(|_| MmioError::QueueMaxSize { index, size })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_out_of_range: false,
            status: 0,
            config_generation: 0,
            activated: false,
            deferred: None,
            activation_pending: false,
        })
    }

    /// Moves activation off the thread that writes DRIVER_OK (a vCPU thread) to whoever
    /// polls the returned eventfd and then calls [`Self::activate_pending`].
    ///
    /// Why: activating a vhost-user device is a conversation with another process
    /// (sendmsg with fds, waiting for replies), which the vCPU threads' seccomp filter
    /// forbids and which would stall the vCPU for its whole length. Meanwhile the driver
    /// sees DRIVER_OK accepted and goes on: its queue kicks land in the ioeventfds and
    /// stay counted there until the backend reads them, so none is lost. Should the
    /// activation fail, the transport sets DEVICE_NEEDS_RESET with a configuration
    /// interrupt, which virtio 1.2 (2.1.2) allows at any time.
    pub fn defer_activation(&mut self) -> io::Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let poll = evt.try_clone()?;
        self.deferred = Some(evt);
        Ok(poll)
    }

    /// Runs an activation deferred by DRIVER_OK; `Ok(true)` if the device was activated
    /// now, `Ok(false)` if none was pending (e.g. the driver reset the device meanwhile).
    pub fn activate_pending(&mut self) -> Result<bool, ActivationFailed> {
        if let Some(evt) = &self.deferred {
            // Consume the wake-up, or a level-triggered loop would spin on it.
            let _ = evt.read();
        }
        if !std::mem::take(&mut self.activation_pending) {
            return Ok(false);
        }
        match self.activate() {
            Ok(()) => {
                self.activated = true;
                Ok(true)
            }
            Err(reason) => {
                self.needs_reset();
                Err(ActivationFailed {
                    device_type: self.device().device_type(),
                    reason: reason.to_string(),
                })
            }
        }
    }

    /// The device's interrupt; register `interrupt().irq_evt()` as its irqfd.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Duplicates of the queue notification eventfds, in queue index order, for
    /// KVM_IOEVENTFD at `base + QUEUE_NOTIFY_OFFSET` with datamatch = the index.
    pub fn queue_notify_eventfds(&self) -> io::Result<Vec<EventFd>> {
        self.device()
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect()
    }

    /// The device type id, for the kernel command line and logs.
    pub fn device_type(&self) -> u32 {
        self.device().device_type()
    }

    /// The device's configuration changed on the host side: bump the generation so the
    /// driver re-reads it, and tell the driver.
    pub fn config_changed(&mut self) -> io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change()
    }

    /// The Status register, for tests and `husk inspect`.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The registers and queue setup, for a snapshot (the vCPUs are paused).
    pub fn state(&self) -> MmioTransportSnapshot {
        MmioTransportSnapshot {
            device_type: self.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            driver_features_out_of_range: self.driver_features_out_of_range,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            active: self.activated || self.activation_pending,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
                .collect(),
        }
    }

    /// Takes the registers from `state` and, if the device was active, activates it
    /// again at once with the queues continuing where the guest memory says they are.
    /// The interrupt is raised afterwards, since one the guest had not yet handled is not
    /// in the snapshot (a spurious one is harmless: the driver finds nothing new).
    pub fn restore_state(&mut self, state: &MmioTransportSnapshot) -> Result<(), String> {
        if state.device_type != self.device_type() || state.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot has device type {} with {} queues, this slot holds type {} with {}",
                state.device_type,
                state.queues.len(),
                self.device_type(),
                self.queues.len()
            ));
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.driver_features_out_of_range = state.driver_features_out_of_range;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.config_generation = state.config_generation;
        for (slot, q) in self.queues.iter_mut().zip(&state.queues) {
            slot.size = q.size;
            slot.ready = q.ready;
            slot.desc = q.desc;
            slot.avail = q.avail;
            slot.used = q.used;
        }
        if !state.active {
            return Ok(());
        }
        self.device().ack_features(self.driver_features);
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, slot) in self.queues.iter().enumerate() {
            let mut q = slot
                .build(&self.mem, event_idx)
                .ok_or_else(|| format!("queue {index} is not valid in the restored memory"))?;
            let used = q
                .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| format!("queue {index}: reading the used index: {e}"))?;
            q.set_next_avail(used.0);
            q.set_next_used(used.0);
            queues.push(q);
        }
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        self.device()
            .activate(mem, interrupt, queues)
            .map_err(|e| e.to_string())?;
        self.activated = true;
        self.interrupt
            .signal_used_buffer()
            .map_err(|e| format!("raising the interrupt: {e}"))
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().expect("virtio device lock poisoned")
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may be written only between FEATURES_OK and DRIVER_OK (4.2.3.2).
    fn queue_setup_allowed(&self) -> bool {
        self.has(status::FEATURES_OK)
            && self.status & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == 0
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device().device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                let offered = self.device().avail_features() | features::VERSION_1;
                match self.device_features_select {
                    0 => offered as u32,
                    1 => (offered >> 32) as u32,
                    _ => 0,
                }
            }
            // 0 tells the driver the selected queue does not exist (4.2.2).
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |s| u32::from(s.max_size)),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |s| u32::from(s.ready)),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length (and base) of -1 says so (4.2.2).
            reg::VIRTIO_MMIO_SHM_LEN_LOW
            | reg::VIRTIO_MMIO_SHM_LEN_HIGH
            | reg::VIRTIO_MMIO_SHM_BASE_LOW
            | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => self.write_queue(|s| s.size = value),
            reg::VIRTIO_MMIO_QUEUE_READY => self.write_queue(|s| s.ready = value == 1),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.write_queue(|s| set_half(&mut s.desc, Low, value))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.write_queue(|s| set_half(&mut s.desc, High, value))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.write_queue(|s| set_half(&mut s.avail, Low, value))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.write_queue(|s| set_half(&mut s.avail, High, value))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.write_queue(|s| set_half(&mut s.used, Low, value))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.write_queue(|s| set_half(&mut s.used, High, value))
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            // There are no shared memory regions to select.
            reg::VIRTIO_MMIO_SHM_SEL => {}
            _ => {
                warn!("virtio-mmio: write {value:#x} to read-only or unknown register {offset:#x}")
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // The driver must not change features once FEATURES_OK is set (3.1.1).
        if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
            warn!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Bits no device here offers: accepting one makes FEATURES_OK fail.
            _ => self.driver_features_out_of_range |= value != 0,
        }
    }

    fn write_queue(&mut self, f: impl FnOnce(&mut QueueSlot)) {
        if !self.queue_setup_allowed() {
            warn!(
                "virtio-mmio: queue register written in status {:#x}",
                self.status
            );
            return;
        }
        match self.selected_queue() {
            Some(slot) => f(slot),
            None => warn!("virtio-mmio: queue {} does not exist", self.queue_select),
        }
    }

    fn notify_queue(&self, index: u32) {
        let dev = self.device();
        match dev.queue_events().get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => warn!("virtio-mmio: notify for queue {index} that does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & !value != 0 {
            warn!("virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x})");
            return;
        }
        if old & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            // Only a reset brings the device back.
            return;
        }
        let added = value & !old;
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // Each step needs the one before it (3.1.1); a step out of order stops here.
        for (bit, needs) in [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ] {
            if added & bit == 0 {
                continue;
            }
            if !self.has(needs) {
                warn!("virtio-mmio: status bit {bit:#x} set before {needs:#x}");
                return;
            }
            let accepted = match bit {
                status::FEATURES_OK => self.features_ok(),
                status::DRIVER_OK => {
                    self.driver_ok();
                    // driver_ok() sets the status itself (DRIVER_OK or NEEDS_RESET).
                    return;
                }
                _ => true,
            };
            if !accepted {
                return;
            }
            self.status |= bit;
        }
        let unknown = added
            & !(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        if unknown != 0 {
            warn!("virtio-mmio: driver set unknown or device-owned status bits {unknown:#x}");
        }
    }

    /// FEATURES_OK sticks only if the driver accepted a subset of the offer that includes
    /// VERSION_1 (there is no legacy interface); otherwise the driver reads it back unset.
    fn features_ok(&mut self) -> bool {
        let mut dev = self.device();
        let offered = dev.avail_features() | features::VERSION_1;
        let accepted = self.driver_features;
        if self.driver_features_out_of_range
            || accepted & !offered != 0
            || accepted & features::VERSION_1 == 0
        {
            warn!(
                "virtio-mmio: driver features {accepted:#x} not acceptable (offered {offered:#x})"
            );
            return false;
        }
        dev.ack_features(accepted);
        true
    }

    fn driver_ok(&mut self) {
        if self.activated || self.activation_pending {
            return;
        }
        if let Some(evt) = &self.deferred {
            self.status |= status::DRIVER_OK;
            self.activation_pending = true;
            if let Err(e) = evt.write(1) {
                warn!("virtio-mmio: cannot request the deferred activation: {e}");
                self.activation_pending = false;
                self.needs_reset();
            }
            return;
        }
        match self.activate() {
            Ok(()) => {
                self.activated = true;
                self.status |= status::DRIVER_OK;
            }
            Err(reason) => {
                warn!("virtio-mmio: activation failed: {reason}");
                self.needs_reset();
            }
        }
    }

    /// 2.1.2: with DRIVER_OK set, DEVICE_NEEDS_RESET comes with a config change
    /// notification.
    fn needs_reset(&mut self) {
        self.status |= status::DRIVER_OK | status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            warn!("virtio-mmio: cannot signal the interrupt: {e}");
        }
    }

    fn activate(&mut self) -> Result<(), DriverOkError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                slot.build(&self.mem, event_idx)
                    .ok_or(DriverOkError::QueueNotValid(index))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        Ok(self.device().activate(mem, interrupt, queues)?)
    }

    fn reset(&mut self) {
        self.device().reset();
        for slot in &mut self.queues {
            *slot = QueueSlot::new(slot.max_size);
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_out_of_range = false;
        self.status = 0;
        self.activated = false;
        self.activation_pending = false;
        self.interrupt.reset();
    }
}

/// The driver must use 32-bit aligned accesses for the registers (4.2.2.2); the spec leaves
/// other accesses undefined, so they read as zero and writes are dropped.
fn register_access(offset: u64, len: usize) -> Option<u32> {
    (len == 4 && offset & 3 == 0).then_some(offset as u32)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device()
                .read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_access(offset, data.len()) {
            Some(reg) => data.copy_from_slice(&self.read_register(reg).to_le_bytes()),
            None => {
                warn!(
                    "virtio-mmio: {}-byte read at {offset:#x} ignored",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device()
                .write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match (
            register_access(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            (Some(reg), Ok(bytes)) => self.write_register(reg, u32::from_le_bytes(bytes)),
            _ => warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
