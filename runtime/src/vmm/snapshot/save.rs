//! The save side: what [`Vm::snapshot`](crate::vmm::Vm::snapshot) gathers, written out.

use std::path::Path;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::serial::SerialState;

use super::devices::{DeviceStates, SerialSnapshot};
use super::fingerprint::Fingerprint;
use super::{file, Header, SnapshotError, VcpuState, VmSnapshot, VmState};

/// What the VMM's devices hold, gathered while the vCPUs are paused.
pub struct DeviceInputs {
    pub serial: SerialState,
    pub virtio_slots: usize,
    pub ready: bool,
    pub virtio: Vec<super::devices::MmioTransportSnapshot>,
    pub vsock_connections: usize,
}

/// Writes a snapshot of a paused VM whose vCPU states were already saved.
pub fn save(
    path: &Path,
    fingerprint: Fingerprint,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    vcpus: Vec<VcpuState>,
    devices: DeviceInputs,
) -> Result<Header, SnapshotError> {
    let state = VmSnapshot {
        mem_size: mem.iter().map(|r| r.len()).sum(),
        vcpus,
        vm: VmState::save(vm)?,
        devices: DeviceStates {
            serial: SerialSnapshot::from(&devices.serial),
            virtio_slots: devices.virtio_slots,
            ready: devices.ready,
            virtio: devices.virtio,
            vsock_connections: devices.vsock_connections,
        },
    };
    file::write(path, fingerprint, &state, mem)
}
