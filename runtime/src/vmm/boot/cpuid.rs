//! The CPUID each vCPU shows its guest: what KVM supports, with the topology made
//! consistent per vCPU (APIC ids, core counts, caches) and the hypervisor leaves set.
//!
//! On PVM hosts the CPUID model also picks the guest's code paths (shared/substrate.md):
//! QEMU only boots with x2APIC and XSAVEERPTR present, the latter because without it an
//! AMD guest takes the "FXSAVE leaks FOP/FIP" path and stops on an emulated `fnclex`.
//! CX16 is hidden because SLUB then uses `cmpxchg16b`, which PVM's emulator lacks (the
//! first boot stopped in `__cmpxchg_double_slab` on `lock cmpxchg16b`); without it SLUB
//! takes a lock instead, on every host.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

use super::cpu_template::CpuTemplate;
use super::platform::GuestPlatform;
use crate::host::HostMode;

/// Errors building the guest CPUID.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed: {0}
    Supported(kvm_ioctls::Error),
    /// the CPUID table is full ({0})
    Full(vmm_sys_util::fam::Error),
    /// KVM_SET_CPUID2 on vCPU {index} failed: {source}
    Set {
        index: u8,
        source: kvm_ioctls::Error,
    },
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_PROC_TOPOLOGY: u32 = 0x8000_001e;

const ECX_CX16: u32 = 1 << 13;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EBX_XSAVEERPTR: u32 = 1 << 2;

/// The signature Linux looks for to enable its KVM paravirt code ("KVMKVMKVM\0\0\0").
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// What KVM can virtualise on this host, the starting point for every vCPU.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` for vCPU `index` of `count`: one socket, one thread per core,
/// APIC id = index, no PMU, and the KVM hypervisor leaf.
pub fn normalize_for_vcpu(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let cpus = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: APIC id [31:24], logical processors per package [23:16], CLFLUSH
                // line size in 8-byte units [15:8].
                e.ebx = (apic_id << 24) | (cpus << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx = (e.ecx | ECX_HYPERVISOR | ECX_X2APIC) & !ECX_CX16;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Type 0 means "no more caches" (and AMD leaves leaf 4 empty): keep it empty.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                // EAX: cores per package - 1 [31:26]; threads sharing this cache - 1
                // [25:14]: caches up to L2 are private, L3 is shared by all cores.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
            }
            LEAF_PERFMON => {
                // No virtual PMU: the guest must not program counters we do not save.
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            LEAF_EXT_TOPOLOGY => {
                let level_type = match e.index {
                    0 => 1, // SMT
                    1 => 2, // core
                    _ => 0,
                };
                (e.eax, e.ebx) = match e.index {
                    0 => (0, 1),
                    1 => (bits_for(cpus), cpus),
                    _ => (0, 0),
                };
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_HYPERVISOR + 1);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_EXT_ADDR_SIZES => {
                e.ebx |= EBX_XSAVEERPTR;
                // ECX: APIC id size [15:12], cores per package - 1 [7:0].
                e.ecx = (bits_for(cpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14);
            }
            LEAF_AMD_PROC_TOPOLOGY => {
                // Extended APIC id; compute unit id with one thread per unit; node 0.
                (e.eax, e.ebx, e.ecx, e.edx) = (apic_id, apic_id & 0xff, 0, 0);
            }
            _ => {}
        }
    }
}

/// KVM may list only subleaf 0 of leaf 0xb (it does on the PVM hosts here). Linux then
/// finds no core level, shifts APIC ids by 0 to get the package, and puts every vCPU in
/// its own package ("Max logical packages: 2"). Adds the core level and the terminator.
fn ensure_ext_topology_subleaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    let has = |c: &CpuId, index: u32| {
        c.as_slice()
            .iter()
            .any(|e| e.function == LEAF_EXT_TOPOLOGY && e.index == index)
    };
    if !has(cpuid, 0) {
        return Ok(());
    }
    for index in 1..=2 {
        if !has(cpuid, index) {
            let entry = kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            cpuid.push(entry).map_err(CpuidError::Full)?;
        }
    }
    Ok(())
}

/// The CPUID for vCPU `index` of `count` under `template` on a host of `mode`, with the
/// husk platform leaves ([`super::platform`]).
pub fn vcpu_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
    template: CpuTemplate,
    mode: HostMode,
) -> Result<CpuId, CpuidError> {
    let mut cpuid = supported.clone();
    ensure_ext_topology_subleaves(&mut cpuid)?;
    normalize_for_vcpu(cpuid.as_mut_slice(), index, count);
    template.apply(cpuid.as_mut_slice());
    for leaf in GuestPlatform::new(cpuid.as_slice(), mode).leaves() {
        cpuid.push(leaf).map_err(CpuidError::Full)?;
    }
    Ok(cpuid)
}

/// The husk platform a guest of `count` vCPUs under `template` sees (the same on every
/// vCPU).
pub fn guest_platform(
    supported: &CpuId,
    count: u8,
    template: CpuTemplate,
    mode: HostMode,
) -> Result<GuestPlatform, CpuidError> {
    let cpuid = vcpu_cpuid(supported, 0, count, template, mode)?;
    Ok(GuestPlatform::new(cpuid.as_slice(), mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(LEAF_FEATURES, 0, 0x00a2_0f12, 0xff00_0000, ECX_CX16, 0),
            entry(LEAF_CACHE_PARAMS, 0, 0x121, 0, 0, 0), // L1 data
            entry(LEAF_CACHE_PARAMS, 3, 0x163, 0, 0, 0), // L3 unified
            entry(LEAF_PERFMON, 0, 0x0803_0002, 1, 2, 3),
            entry(LEAF_EXT_TOPOLOGY, 0, 9, 9, 9, 9),
            entry(LEAF_EXT_TOPOLOGY, 1, 9, 9, 9, 9),
            entry(LEAF_EXT_TOPOLOGY, 2, 9, 9, 9, 9),
            entry(LEAF_HYPERVISOR, 0, 0, 0, 0, 0),
            entry(LEAF_EXT_ADDR_SIZES, 0, 0x3030, 0, 0xff, 0),
            entry(LEAF_AMD_PROC_TOPOLOGY, 0, 7, 7, 7, 7),
        ]
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id() {
        for index in 0..4u8 {
            let mut e = sample();
            normalize_for_vcpu(&mut e, index, 4);
            let leaf1 = find(&e, LEAF_FEATURES, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(index));
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
            assert_ne!(leaf1.edx & EDX_HTT, 0);
            assert_eq!(find(&e, LEAF_EXT_TOPOLOGY, 0).edx, u32::from(index));
            assert_eq!(find(&e, LEAF_EXT_TOPOLOGY, 1).edx, u32::from(index));
            assert_eq!(find(&e, LEAF_AMD_PROC_TOPOLOGY, 0).eax, u32::from(index));
        }
    }

    #[test]
    fn topology_describes_one_socket_of_single_thread_cores() {
        let mut e = sample();
        normalize_for_vcpu(&mut e, 1, 3);
        let smt = find(&e, LEAF_EXT_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
        let core = find(&e, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 3, 0x201));
        let end = find(&e, LEAF_EXT_TOPOLOGY, 2);
        assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
        let l1 = find(&e, LEAF_CACHE_PARAMS, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax >> 26, 2);
        let l3 = find(&e, LEAF_CACHE_PARAMS, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!(find(&e, LEAF_EXT_ADDR_SIZES, 0).ecx, 0x2002);
    }

    #[test]
    fn guest_sees_hypervisor_kvm_x2apic_and_no_pmu() {
        let mut e = sample();
        normalize_for_vcpu(&mut e, 0, 1);
        let leaf1 = find(&e, LEAF_FEATURES, 0);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_X2APIC, 0);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(leaf1.ecx & ECX_CX16, 0, "cmpxchg16b must be hidden");
        let hv = find(&e, LEAF_HYPERVISOR, 0);
        let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(hv.eax, LEAF_HYPERVISOR + 1);
        let pmu = find(&e, LEAF_PERFMON, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        assert_ne!(find(&e, LEAF_EXT_ADDR_SIZES, 0).ebx & EBX_XSAVEERPTR, 0);
    }

    #[test]
    fn a_missing_core_level_is_added_so_all_vcpus_share_one_package() {
        let only_smt = [
            entry(LEAF_EXT_TOPOLOGY, 0, 0, 0, 0, 0),
            entry(LEAF_CACHE_PARAMS, 0, 0, 0, 0, 0),
        ];
        let supported = CpuId::from_entries(&only_smt).unwrap();
        let cpuid = vcpu_cpuid(&supported, 1, 2, CpuTemplate::Host, HostMode::Hardware).unwrap();
        let e = cpuid.as_slice();
        let core = find(e, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        assert_eq!(find(e, LEAF_EXT_TOPOLOGY, 2).ecx, 2);
        assert_ne!(core.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        assert_eq!(
            find(e, LEAF_CACHE_PARAMS, 0).eax,
            0,
            "an empty leaf 4 stays empty"
        );
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5].map(bits_for), [0, 1, 2, 2, 3]);
    }
}
