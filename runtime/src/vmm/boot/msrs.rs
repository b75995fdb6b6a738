//! Model-specific registers set on every vCPU before it first runs.
//!
//! Only what a freshly reset CPU would hold and Linux relies on: syscall/sysenter MSRs
//! cleared, TSC at zero, fast strings on, MTRRs defaulting to write-back (with MTRRs
//! off Linux maps all RAM uncached, which is very slow), and on AMD the TSC frequency
//! select firmware sets. MSRs that KVM does not list as supported on this host are
//! skipped: writing one fails the whole batch (QEMU's `-cpu host` aborts on MSR 0x10a on
//! PVM hosts for that reason).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors setting MSRs.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MsrError {
    /// KVM_GET_MSR_INDEX_LIST failed: {0}
    IndexList(kvm_ioctls::Error),
    /// building the MSR list failed: {0}
    Build(vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed: {0}
    Set(kvm_ioctls::Error),
    /// KVM accepted only {set} of {total} boot MSRs; MSR {first_rejected:#x} was refused
    Partial {
        set: usize,
        total: usize,
        first_rejected: u32,
    },
}

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_K7_HWCR: u32 = 0xc001_0015;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
/// AMD HWCR TscFreqSel (bit 24): the TSC counts at the P0 frequency, as firmware sets it
/// on every AMD CPU with a constant TSC. Without it an AMD guest warns "[Firmware Bug]:
/// TSC doesn't count with P0 frequency!" on the console at every boot. Intel hosts do
/// not list the MSR, so it is skipped there.
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// The boot MSRs and their values.
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    (MSR_K7_HWCR, HWCR_TSC_FREQ_SEL),
];

/// The boot MSRs that appear in `supported` (KVM's index list for this host).
pub fn boot_msr_entries(supported: &[u32]) -> Vec<kvm_msr_entry> {
    BOOT_MSRS
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// The MSR indices KVM can save and restore on this host.
pub fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>, MsrError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(MsrError::IndexList)?
        .as_slice()
        .to_vec())
}

/// Writes the boot MSRs into `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), MsrError> {
    let entries = boot_msr_entries(supported);
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            total: entries.len(),
            first_rejected: entries[set].index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_msrs_are_skipped_and_values_kept() {
        let supported = [MSR_IA32_TSC, MSR_MTRR_DEF_TYPE, MSR_LSTAR, 0x10a];
        let entries = boot_msr_entries(&supported);
        let got: Vec<(u32, u64)> = entries.iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(
            got,
            vec![
                (MSR_LSTAR, 0),
                (MSR_IA32_TSC, 0),
                (MSR_MTRR_DEF_TYPE, 0x806)
            ]
        );
    }

    #[test]
    fn boot_list_has_no_duplicates_and_never_touches_arch_capabilities() {
        let mut indices: Vec<u32> = BOOT_MSRS.iter().map(|m| m.0).collect();
        indices.sort();
        indices.dedup();
        assert_eq!(indices.len(), BOOT_MSRS.len());
        assert!(!indices.contains(&0x10a));
    }
}
