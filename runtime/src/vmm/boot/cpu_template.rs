//! CPU templates: the named CPUID model a sandbox's vCPUs present to the guest, chosen per
//! sandbox (`--cpu-template`).
//!
//! - `host`: everything KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`), made
//!   consistent per vCPU by [`super::cpuid`] (topology, hypervisor leaf, CX16 hidden,
//!   x2APIC and XSAVEERPTR shown).
//! - `host-min`: `host` reduced to an allowlist: the features a 64-bit Linux guest needs to
//!   boot on the hosts here and that keep it on cheap code paths. Everything else is
//!   hidden, so the guest kernel does not patch in, probe or use instructions and MSRs
//!   that cost emulated instructions on PVM (shared/substrate.md) and that a sandbox does
//!   not need: no XSAVE/AVX state, no PCID/INVPCID, no SMAP/SMEP, no POPCNT, no
//!   speculation-control MSRs, no MONITOR/MWAIT, no PMU, no async page faults or steal
//!   time. It keeps TSC-deadline and ARAT, with which the guest needs no PIT. Bits are
//!   only ever cleared relative to `host`, so `host-min` never offers a feature KVM
//!   cannot virtualise.
//!
//! Both templates leave the MSRs set at boot alike ([`super::msrs`]): the boot MSRs are
//! architectural and a reset CPU holds them whatever its feature set.
//!
//! On PVM hosts the guest *kernel*'s own `CPUID` may still report host bits that
//! `KVM_SET_CPUID2` cannot clear; the PVM command line (`cmdline.pvm`) tells the kernel not
//! to use those. The read-back test (tests/tests/vmm_cpu_template.rs) shows which bits the
//! guest actually sees under each template.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

/// Errors naming a CPU template.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum CpuTemplateError {
    /// unknown CPU template "{0}"; use one of: host-min, host
    Unknown(String),
}

/// A named CPUID model for a sandbox's vCPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// The minimal feature set that boots here and keeps the guest on cheap code paths.
    #[default]
    HostMin,
    /// Everything KVM supports on this host.
    Host,
}

impl CpuTemplate {
    /// Every template, in the order `--help` lists them.
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::HostMin, CpuTemplate::Host];

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::HostMin => "host-min",
            CpuTemplate::Host => "host",
        }
    }

    /// Applies the template to a vCPU's CPUID after the per-vCPU normalisation.
    pub fn apply(self, entries: &mut [kvm_cpuid_entry2]) {
        if self == CpuTemplate::Host {
            return;
        }
        for e in entries.iter_mut() {
            if let Some(mask) = host_min_mask(e.function, e.index) {
                e.eax &= mask.eax;
                e.ebx &= mask.ebx;
                e.ecx &= mask.ecx;
                e.edx &= mask.edx;
            }
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuTemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CpuTemplateError::Unknown(s.to_string()))
    }
}

/// Which bits of each register survive (1 = kept when KVM offers it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMask {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const KEEP: u32 = u32::MAX;
const HIDE: u32 = 0;

/// Leaf 1 EDX: FPU, DE, PSE, TSC, MSR, PAE, CX8, APIC, SEP, MTRR, PGE, CMOV, PAT, PSE36,
/// CLFLUSH, MMX, FXSR, SSE, SSE2, HTT. Not VME, MCE/MCA (no machine-check code to run in
/// a VM), DS/ACPI/TM/PBE (host power and debug features).
pub const HOST_MIN_LEAF1_EDX: u32 = (1 << 0)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26)
    | (1 << 28);

/// Leaf 1 ECX: SSE3, SSSE3, SSE4.1, SSE4.2, x2APIC (APIC through MSRs, not emulated
/// MMIO), TSC-deadline (the kernel skips the LAPIC timer calibration) and the hypervisor
/// bit. Not MONITOR, PCID, POPCNT (not emulated on PVM), XSAVE/OSXSAVE/AVX (not emulated),
/// CX16 (already hidden by every template), AES/RDRAND/MOVBE/F16C.
pub const HOST_MIN_LEAF1_ECX: u32 =
    (1 << 0) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 24) | (1 << 31);

/// Leaf 0x8000_0001 EDX: SYSCALL, NX, RDTSCP, LM, and the AMD copies of the leaf 1 bits
/// above (bits 0-17, 23-24: FPU..PSE36, MMX, FXSR). Not 1 GiB pages or FFXSR.
pub const HOST_MIN_EXT1_EDX: u32 = (0x0183_ffff & !((1 << 1) | (1 << 7) | (1 << 14)))
    | (1 << 11)
    | (1 << 20)
    | (1 << 27)
    | (1 << 29);

/// Leaf 0x8000_0001 ECX: LAHF/SAHF in long mode only.
pub const HOST_MIN_EXT1_ECX: u32 = 1 << 0;

/// Leaf 0x8000_0008 EBX: XSAVEERPTR only (without it an AMD guest takes the "FXSAVE leaks
/// FOP/FIP" path, whose `fnclex` PVM cannot emulate); no IBPB/IBRS/SSBD/STIBP controls.
pub const HOST_MIN_EXT8_EBX: u32 = 1 << 2;

/// Leaf 0x8000_0007 EDX: invariant TSC only (no power-management features).
pub const HOST_MIN_EXT7_EDX: u32 = 1 << 8;

/// Leaf 6 EAX: ARAT (always running APIC timer) only.
pub const HOST_MIN_LEAF6_EAX: u32 = 1 << 2;

/// Leaf 0x4000_0001 EAX (KVM paravirt features): kvm-clock (both MSR sets), no port 0x80
/// delays (each is a trapped `out`), PV EOI (an EOI without a trap), and the stable
/// kvm-clock bit. Not async page faults, steal time, PV unhalt/TLB flush/IPIs/yield or
/// poll control: each adds per-tick or per-switch work to an emulated guest kernel and
/// buys nothing for a sandbox of a few vCPUs that is never overcommitted on purpose.
pub const HOST_MIN_KVM_FEATURES: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 24);

/// The `host-min` mask for a leaf, or `None` for leaves kept as `host` shows them
/// (vendor, family/model, caches, topology, address sizes, hypervisor signature).
pub fn host_min_mask(function: u32, index: u32) -> Option<RegisterMask> {
    let mask = |eax, ebx, ecx, edx| Some(RegisterMask { eax, ebx, ecx, edx });
    match (function, index) {
        // EAX: signature; EBX: APIC id and counts (set per vCPU).
        (0x1, _) => mask(KEEP, KEEP, HOST_MIN_LEAF1_ECX, HOST_MIN_LEAF1_EDX),
        // Thermal and power management: only ARAT, the local APIC timer runs in every
        // C-state (KVM's always does). Without it Linux also sets up the PIT at boot,
        // ticks on it, and needs ISA interrupt 0 (super::platform).
        (0x6, _) => mask(HOST_MIN_LEAF6_EAX, HIDE, HIDE, HIDE),
        // Structured extended features: subleaf 0 keeps only its max-subleaf count; none
        // of FSGSBASE, SMEP, SMAP, ERMS, INVPCID, CLFLUSHOPT, CLWB, UMIP, PKU,
        // ARCH_CAPABILITIES, speculation controls.
        (0x7, 0) => mask(KEEP, HIDE, HIDE, HIDE),
        (0x7, _) => mask(HIDE, HIDE, HIDE, HIDE),
        // XSAVE state components: none (noxsave on PVM; FXSAVE is enough for a sandbox).
        (0xd, _) => mask(HIDE, HIDE, HIDE, HIDE),
        // Processor trace, SGX, AMX and friends.
        (0x12 | 0x14 | 0x19 | 0x1d | 0x1e, _) => mask(HIDE, HIDE, HIDE, HIDE),
        (0x4000_0001, _) => mask(HOST_MIN_KVM_FEATURES, HIDE, HIDE, HIDE),
        (0x8000_0001, _) => mask(KEEP, KEEP, HOST_MIN_EXT1_ECX, HOST_MIN_EXT1_EDX),
        (0x8000_0007, _) => mask(HIDE, HIDE, HIDE, HOST_MIN_EXT7_EDX),
        (0x8000_0008, _) => mask(KEEP, HOST_MIN_EXT8_EBX, KEEP, HIDE),
        // AMD SVM, memory encryption, extended features 2 (speculation, etc.).
        (0x8000_000a | 0x8000_001f | 0x8000_0021, _) => mask(HIDE, HIDE, HIDE, HIDE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ones(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for t in CpuTemplate::ALL {
            assert_eq!(t.name().parse::<CpuTemplate>(), Ok(t));
            assert_eq!(t.to_string(), t.name());
        }
        let err = "t2s".parse::<CpuTemplate>().unwrap_err().to_string();
        assert!(
            err.contains("\"t2s\"") && err.contains("host-min, host"),
            "{err}"
        );
    }

    #[test]
    fn host_changes_nothing() {
        let mut e = [all_ones(0x1, 0), all_ones(0x7, 0), all_ones(0x4000_0001, 0)];
        CpuTemplate::Host.apply(&mut e);
        for entry in &e {
            assert_eq!(regs(entry), [u32::MAX; 4]);
        }
    }

    #[test]
    fn host_min_keeps_exactly_its_allowlists() {
        let mut e = [
            all_ones(0x1, 0),
            all_ones(0x7, 0),
            all_ones(0x7, 1),
            all_ones(0xd, 1),
            all_ones(0x4000_0001, 0),
            all_ones(0x8000_0001, 0),
            all_ones(0x8000_0008, 0),
            all_ones(0x4000_0000, 0),
        ];
        CpuTemplate::HostMin.apply(&mut e);
        let hv = HOST_MIN_LEAF1_ECX;
        assert_eq!(regs(&e[0]), [u32::MAX, u32::MAX, hv, HOST_MIN_LEAF1_EDX]);
        assert_eq!(regs(&e[1]), [u32::MAX, 0, 0, 0]);
        assert_eq!(regs(&e[2]), [0; 4]);
        assert_eq!(regs(&e[3]), [0; 4]);
        assert_eq!(regs(&e[4]), [HOST_MIN_KVM_FEATURES, 0, 0, 0]);
        assert_eq!(
            regs(&e[5]),
            [u32::MAX, u32::MAX, HOST_MIN_EXT1_ECX, HOST_MIN_EXT1_EDX]
        );
        assert_eq!(regs(&e[6]), [u32::MAX, 1 << 2, u32::MAX, 0]);
        assert_eq!(regs(&e[7]), [u32::MAX; 4], "the hypervisor signature stays");
    }

    #[test]
    fn host_min_hides_what_pvm_cannot_emulate_and_keeps_what_the_guest_needs() {
        // Leaf 1 ECX: POPCNT 23, XSAVE 26, OSXSAVE 27, AVX 28, RDRAND 30, PCID 17, CX16 13.
        for bit in [13, 17, 23, 26, 27, 28, 30] {
            assert_eq!(HOST_MIN_LEAF1_ECX & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        // x2APIC, hypervisor.
        assert_eq!(HOST_MIN_LEAF1_ECX & (1 << 21 | 1 << 31), 1 << 21 | 1 << 31);
        // Long mode, NX, SYSCALL must stay or a 64-bit kernel does not boot.
        for bit in [11, 20, 29] {
            assert_ne!(
                HOST_MIN_EXT1_EDX & (1 << bit),
                0,
                "ext leaf 1 edx bit {bit}"
            );
        }
        // FXSR, SSE, SSE2, APIC, TSC, MSR, PAE, CX8, CMOV, PGE in leaf 1 EDX.
        for bit in [24, 25, 26, 9, 4, 5, 6, 8, 15, 13] {
            assert_ne!(HOST_MIN_LEAF1_EDX & (1 << bit), 0, "leaf 1 edx bit {bit}");
        }
        // kvm-clock stays, async page faults and steal time go.
        assert_ne!(HOST_MIN_KVM_FEATURES & (1 << 3), 0);
        assert_eq!(HOST_MIN_KVM_FEATURES & (1 << 4 | 1 << 5), 0);
    }
}
