//! State of the VMM's own devices. KVM's devices are in [`super::vm`].

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// COM1's registers and input FIFO (mirrors vm-superio's `SerialState`, which has no
/// serde support of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The devices with state a restore must bring back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnapshot,
    /// virtio-mmio slots that were on the bus; a restore must get the same number, in
    /// the same order, since the guest kernel found them on its command line at boot.
    pub virtio_slots: usize,
    /// The guest had signalled ready (a template): the restored VM counts as ready as
    /// soon as its state is back, since the guest will not signal again.
    pub ready: bool,
    /// The virtio-mmio transports of the VM's device set, in the order they were placed.
    pub virtio: Vec<MmioTransportSnapshot>,
    /// vsock streams open at the snapshot (their host ends are not restored).
    pub vsock_connections: usize,
}

/// One virtio-mmio queue as the driver configured it. The ring positions are not stored:
/// devices here return every chain they pop before the event loop sleeps, so on restore
/// both positions are the used ring's index, read from the restored guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A virtio-mmio transport's registers, and whether its device was active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub driver_features_out_of_range: bool,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub config_generation: u32,
    /// DRIVER_OK was set and accepted (or its deferred activation was due).
    pub active: bool,
    pub queues: Vec<QueueSnapshot>,
}
