//! VM-wide KVM state: the in-kernel interrupt controllers, the PIT and the clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::blob::Blob;
use super::SnapshotError;

/// The in-kernel devices of a VM created by [`crate::vmm::kvm::create_vm`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Blob,
    pub pic_slave: Blob,
    pub ioapic: Blob,
    pub pit: Blob,
    pub clock: Blob,
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SnapshotError> {
    r.map_err(|source| SnapshotError::Kvm { what, source })
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<Blob, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    kvm("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip))?;
    Ok(Blob::of(&chip))
}

fn set_chip(
    vm: &VmFd,
    blob: &Blob,
    field: &'static str,
    chip_id: u32,
) -> Result<(), SnapshotError> {
    let chip: kvm_irqchip = blob.decode(field)?;
    if chip.chip_id != chip_id {
        return Err(SnapshotError::Inconsistent(format!(
            "{field} holds irqchip {} instead of {chip_id}",
            chip.chip_id
        )));
    }
    kvm("KVM_SET_IRQCHIP", vm.set_irqchip(&chip))
}

impl VmState {
    /// Saves the VM's devices; the vCPUs must be paused.
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        Ok(Self {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: Blob::of(&kvm("KVM_GET_PIT2", vm.get_pit2())?),
            clock: Blob::of(&kvm("KVM_GET_CLOCK", vm.get_clock())?),
        })
    }

    /// Restores into a VM made by `create_vm` (irqchip and PIT exist), before any vCPU
    /// runs.
    ///
    /// The clock is set with no flags: the guest's kvmclock continues from the instant of
    /// the snapshot instead of jumping by the time the snapshot sat on disk (a jump would
    /// fire every guest timer at once). Wall-clock time is the guest's to refresh.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        set_chip(vm, &self.pic_master, "pic_master", KVM_IRQCHIP_PIC_MASTER)?;
        set_chip(vm, &self.pic_slave, "pic_slave", KVM_IRQCHIP_PIC_SLAVE)?;
        set_chip(vm, &self.ioapic, "ioapic", KVM_IRQCHIP_IOAPIC)?;
        kvm("KVM_SET_PIT2", vm.set_pit2(&self.pit.decode("pit")?))?;
        let saved: kvm_clock_data = self.clock.decode("clock")?;
        let clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        kvm("KVM_SET_CLOCK", vm.set_clock(&clock))
    }
}
