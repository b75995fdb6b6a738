//! The restore side: a snapshot checked and its RAM mapped when the builder is created,
//! then KVM and device state put back when it starts.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::fingerprint::Fingerprint;
use super::{file, memory, Header, SnapshotError, VmSnapshot};
use crate::vmm::devices::serial::SerialDevice;
use crate::vmm::devices::virtio::mmio::MmioTransport;

/// A snapshot whose file was checked and whose RAM is mapped, waiting for
/// [`VmBuilder::start`](crate::vmm::VmBuilder::start).
pub struct LoadedSnapshot {
    pub header: Header,
    pub state: VmSnapshot,
    /// Kept open: the RAM mapping reads from it.
    _file: File,
}

impl std::fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl LoadedSnapshot {
    /// Reads and checks `path` for a VM of `vcpus` vCPUs and `mem_size` bytes, and maps its
    /// RAM privately (copy-on-write, loaded lazily), or copies it into a shared memfd when
    /// `shared` (a vhost-user backend must map guest RAM).
    pub fn load(
        path: &Path,
        vcpus: u8,
        mem_size: u64,
        shared: bool,
    ) -> Result<(Self, GuestMemoryMmap), SnapshotError> {
        let (header, state, file) = file::read(path)?;
        let shape = |what, found: usize, expected: u64| {
            if found as u64 == expected {
                Ok(())
            } else {
                Err(SnapshotError::Shape {
                    what,
                    found: found as u64,
                    expected,
                })
            }
        };
        shape("vCPUs", state.vcpus.len(), u64::from(vcpus))?;
        shape("bytes of RAM", state.mem_size as usize, mem_size)?;
        for (i, v) in state.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(SnapshotError::Inconsistent(format!(
                    "vCPU state {i} is labelled vCPU {}",
                    v.index
                )));
            }
        }
        let mem = if shared {
            memory::copy_to_memfd(&file, header.mem_offset, header.mem_len)?
        } else {
            memory::map_private(&file, header.mem_offset, header.mem_len)?
        };
        Ok((
            Self {
                header,
                state,
                _file: file,
            },
            mem,
        ))
    }

    /// Fails unless the snapshot was made for the configuration `expected`.
    pub fn check_fingerprint(&self, expected: Fingerprint) -> Result<(), SnapshotError> {
        if self.header.fingerprint == expected {
            Ok(())
        } else {
            Err(SnapshotError::Mismatch {
                found: self.header.fingerprint,
                expected,
            })
        }
    }

    /// Restores the in-kernel devices (before the vCPUs). `virtio_slots` is how many
    /// virtio-mmio devices the new VM has.
    pub fn restore_vm(&self, vm: &VmFd, virtio_slots: usize) -> Result<(), SnapshotError> {
        if virtio_slots != self.state.devices.virtio_slots {
            return Err(SnapshotError::Shape {
                what: "virtio-mmio devices",
                found: self.state.devices.virtio_slots as u64,
                expected: virtio_slots as u64,
            });
        }
        self.state.vm.restore(vm)
    }

    /// Restores the VMM's devices. After the vCPUs: restoring a LAPIC would drop an
    /// interrupt these raise.
    pub fn restore_devices<'a>(
        &self,
        serial: &mut SerialDevice,
        transports: impl ExactSizeIterator<Item = &'a Arc<Mutex<MmioTransport>>>,
    ) -> Result<(), SnapshotError> {
        if transports.len() != self.state.devices.virtio.len() {
            return Err(SnapshotError::Shape {
                what: "virtio devices of the device set",
                found: self.state.devices.virtio.len() as u64,
                expected: transports.len() as u64,
            });
        }
        for (transport, state) in transports.zip(&self.state.devices.virtio) {
            transport
                .lock()
                .expect("transport lock poisoned")
                .restore_state(state)
                .map_err(|reason| SnapshotError::Device {
                    device: "a virtio device",
                    reason,
                })?;
        }
        serial
            .restore_state(&(&self.state.devices.serial).into())
            .map_err(|e| SnapshotError::Device {
                device: "the serial port",
                reason: e.to_string(),
            })
    }

    /// Creates the vCPUs with the given CPUID (one per vCPU, as a boot would set) and
    /// their saved state.
    pub fn create_vcpus(&self, vm: &VmFd, cpuids: &[CpuId]) -> Result<Vec<VcpuFd>, SnapshotError> {
        self.state
            .vcpus
            .iter()
            .zip(cpuids)
            .map(|(state, vcpu_cpuid)| {
                let index = state.index;
                let vcpu_err = |reason: String| SnapshotError::Vcpu { index, reason };
                let fd = vm
                    .create_vcpu(u64::from(index))
                    .map_err(|e| vcpu_err(format!("KVM_CREATE_VCPU failed: {e}")))?;
                fd.set_cpuid2(vcpu_cpuid)
                    .map_err(|e| vcpu_err(format!("KVM_SET_CPUID2 failed: {e}")))?;
                state.restore(&fd)?;
                Ok(fd)
            })
            .collect()
    }
}
