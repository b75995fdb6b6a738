//! Opening KVM and creating the VM: capabilities checked up front (so a host that lacks
//! one fails with its name, not a cryptic ioctl error later), KVM's private pages placed in
//! the MMIO hole, the in-kernel irqchip and PIT, and guest RAM registered as memory slots.

use std::ffi::CStr;

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::memory::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors setting up KVM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KvmError {
    /// cannot open {path}: {source}; load the kvm module (kvm_intel, kvm_amd or kvm_pvm) and make {path} readable and writable for this user
    Open {
        path: String,
        source: kvm_ioctls::Error,
    },
    /// the KVM device answers API version {0} (-1: not a KVM device); husk needs 12
    ApiVersion(i32),
    /// this KVM lacks {0}, which husk needs
    MissingCap(&'static str),
    /// {what} failed: {source}
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// {0} vCPUs requested but this KVM allows at most {1}
    TooManyVcpus(u8, usize),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// The capabilities the VMM relies on, with the names users can look up.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// The KVM device.
pub const KVM_PATH: &CStr = c"/dev/kvm";

/// Opens /dev/kvm and checks it can run a husk VM with `vcpus` vCPUs.
pub fn open_kvm(vcpus: u8) -> Result<Kvm, KvmError> {
    open_kvm_at(KVM_PATH, vcpus)
}

/// Opens the KVM device at `path` (tests use a path that cannot work).
pub fn open_kvm_at(path: &CStr, vcpus: u8) -> Result<Kvm, KvmError> {
    let kvm = Kvm::new_with_path(path).map_err(|source| KvmError::Open {
        path: path.to_string_lossy().into_owned(),
        source,
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    if let Some((_, name)) = REQUIRED_CAPS
        .iter()
        .find(|(cap, _)| !kvm.check_extension(*cap))
    {
        return Err(KvmError::MissingCap(name));
    }
    if usize::from(vcpus) > kvm.get_max_vcpus() {
        return Err(KvmError::TooManyVcpus(vcpus, kvm.get_max_vcpus()));
    }
    Ok(kvm)
}

/// Creates the VM with its irqchip (PIC + IOAPIC + LAPICs) and PIT in the kernel, so
/// interrupts and timers never need the VMM.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    mask_legacy_pics(&vm)?;
    // The speaker port (0x61) is answered by KVM with a dummy, so calibration reads of
    // it do not exit to us.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Masks every input of both 8259 PICs, as firmware hands them over. KVM resets them
/// unmasked and unprogrammed (vector base 0), and the boot vCPU's LINT0 takes their
/// output (virtual wire, [`super::boot::regs`]): a guest that never sets the PIC up
/// because the husk platform leaves say it has none ([`super::boot::platform`]) would
/// otherwise take a device's ISA interrupt as vector 0..15, a CPU exception. A guest
/// that uses the PIC programs its masks itself.
fn mask_legacy_pics(vm: &VmFd) -> Result<(), KvmError> {
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        // For the PIC chip ids KVM_GET_IRQCHIP fills, and KVM_SET_IRQCHIP reads, the
        // `pic` member of the union.
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Tells KVM about each guest RAM region, one memory slot each.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| KvmError::Ioctl {
                what: "guest memory lookup",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which the VM keeps alive (the builder and
        // the running Vm own it) for as long as the VM fd exists; slots do not overlap.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_kvm_device_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_kvm = dir.path().join("kvm");
        std::fs::write(&not_kvm, b"").unwrap();
        let missing = std::ffi::CString::new(dir.path().join("nope").to_str().unwrap()).unwrap();
        let err = open_kvm_at(&missing, 1).unwrap_err().to_string();
        assert!(err.contains("cannot open") && err.contains("nope"), "{err}");
        assert!(err.contains("readable and writable"), "{err}");
        // A regular file opens but is not KVM: the version ioctl fails, and we say so.
        let plain = std::ffi::CString::new(not_kvm.to_str().unwrap()).unwrap();
        let err = open_kvm_at(&plain, 1).unwrap_err().to_string();
        assert!(err.contains("API version"), "{err}");
    }
}
