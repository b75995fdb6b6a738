//! The husk platform leaves: CPUID 0x4000_0100 and up tell husk's guest kernel (patch
//! 0021 in guest-kernel-config/patches) two facts it cannot learn from the hardware it
//! sees:
//!
//! - which CPU features it must not use. On PVM hosts the guest kernel's own `CPUID`
//!   shows host features that `KVM_SET_CPUID2` cannot hide and PVM cannot emulate
//!   (shared/substrate.md). The command line names them too (`clearcpuid=` in
//!   cmdline.pvm, for kernels without the patch), but matching those names against
//!   every feature name cost the guest ~0.17 M emulated instructions; the leaves give the
//!   same features as capability-word bits.
//! - that it needs no legacy PIC: every husk device interrupt goes through the IO-APIC
//!   and the timer is the local APIC's TSC deadline, so the guest does not set up the
//!   8259 nor preallocate the 16 ISA interrupts, each with a sysfs and a procfs
//!   directory (~0.3 M emulated instructions). The MP table then routes only the pins in
//!   use ([`super::mptable`]). Only with TSC deadline and ARAT: without either the kernel
//!   sets up the PIT, on ISA interrupt 0, for its ticks or to calibrate its local APIC
//!   timer (`apic_needs_pit`).
//! - that its TSC can be its clock: the vCPUs show an invariant TSC, husk writes every
//!   vCPU's TSC at boot (KVM keeps them in step) and restores it from a snapshot before
//!   the guest runs again, so it never goes back. The guest kernel (patch 0024) then
//!   reads the TSC for `sched_clock()` and timekeeping instead of kvm-clock, whose every
//!   read costs ~45 emulated instructions (~0.1 M to `Run /init`), and skips the
//!   clocksource watchdog.
//! - that its RAM is zero but for what the VMM loaded: every boot gets a fresh memfd
//!   ([`crate::vmm::memory::create_guest_memory`]; a snapshot is restored, not booted),
//!   and the VMM writes only the kernel, the initramfs and the first MiB, which the
//!   kernel reserves. The guest kernel (patch 0026) then does not clear its BSS nor its
//!   boot memmap: ~0.33 M `rep stosq` iterations, each emulated on PVM hosts (~0.3 s).
//!
//! Layout (the guest kernel's side is patches 0021, 0024 and 0026):
//!
//! | leaf | eax | ebx, ecx, edx |
//! | --- | --- | --- |
//! | 0x4000_0100 | highest husk leaf | "HuskHuskHusk" |
//! | 0x4000_0101 | flags: bit 0 no legacy PIC, bit 1 features listed, bit 2 TSC clock, bit 3 RAM zeroed | 0 |
//! | 0x4000_0102 + n | capability words 4n .. 4n+3 to clear (eax, ebx, ecx, edx) | |
//!
//! Capability words use the X86_FEATURE numbering of husk's guest kernel (Linux 6.1,
//! arch/x86/include/asm/cpufeatures.h: word * 32 + bit).

use kvm_bindings::kvm_cpuid_entry2;

use crate::host::HostMode;

/// The first husk leaf (a hypervisor range of its own, after KVM's 0x4000_0000).
pub const HUSK_LEAF_BASE: u32 = 0x4000_0100;
/// "Husk" in each of EBX, ECX and EDX of the first leaf.
pub const HUSK_SIGNATURE: u32 = u32::from_le_bytes(*b"Husk");
/// Flag: the guest has no legacy PIC to set up.
pub const FLAG_NO_LEGACY_PIC: u32 = 1 << 0;
/// Flag: the feature leaves list what `clearcpuid=` names.
pub const FLAG_FEATURES_LISTED: u32 = 1 << 1;
/// Flag: the TSC is a reliable clock for the guest.
pub const FLAG_TSC_CLOCK: u32 = 1 << 2;
/// Flag: the guest's RAM is zero but for what the VMM loaded.
pub const FLAG_RAM_ZEROED: u32 = 1 << 3;
/// Capability words of the guest kernel (NCAPINTS in Linux 6.1).
const CAP_WORDS: usize = 22;

/// Leaf 1 ECX: TSC-deadline timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 6 EAX: always running APIC timer.
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 0x8000_0007 EDX: invariant TSC (KVM shows it only when the host's TSC is).
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// The features cmdline.pvm's `clearcpuid=` names, as (name, word, bit) of the guest
/// kernel's X86_FEATURE numbering.
pub const PVM_HIDDEN_FEATURES: [(&str, u32, u32); 19] = [
    ("smap", 9, 20),
    ("smep", 9, 7),
    ("popcnt", 4, 23),
    ("fsgsbase", 9, 0),
    ("rdrand", 4, 30),
    ("rdseed", 9, 18),
    ("rdpid", 16, 22),
    ("invpcid", 9, 10),
    ("pcid", 4, 17),
    ("clflushopt", 9, 23),
    ("clwb", 9, 24),
    ("erms", 9, 9),
    ("fsrm", 18, 4),
    ("umip", 16, 2),
    ("pku", 16, 3),
    ("xsaves", 10, 3),
    ("xsaveopt", 10, 0),
    ("xsavec", 10, 1),
    ("cx16", 4, 13),
];

/// `noxsave` of cmdline.pvm as a feature bit (X86_FEATURE_XSAVE, word 4 bit 26): the
/// kernel clears XSAVE and its dependents from the leaves as `noxsave` does, at the same
/// point of boot (patch 0021 reads the leaves right after the `noxsave` check).
pub const PVM_NOXSAVE: (u32, u32) = (4, 26);

/// What the husk leaves tell a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPlatform {
    /// No 8259 PIC: the MP table routes only the pins in use.
    pub no_legacy_pic: bool,
    /// The TSC is the guest's clock (invariant TSC in the vCPUs' CPUID).
    pub tsc_clock: bool,
    /// Capability words of the features the guest kernel must not use.
    pub hidden: [u32; CAP_WORDS],
}

impl GuestPlatform {
    /// The platform for a guest whose vCPU 0 shows `cpuid` (after its CPU template), on
    /// a host of `mode`.
    pub fn new(cpuid: &[kvm_cpuid_entry2], mode: HostMode) -> Self {
        let has = |function, bit: fn(&kvm_cpuid_entry2) -> bool| {
            cpuid
                .iter()
                .find(|e| e.function == function && e.index == 0)
                .is_some_and(bit)
        };
        let no_pit = has(1, |e| e.ecx & LEAF1_ECX_TSC_DEADLINE != 0)
            && has(6, |e| e.eax & LEAF6_EAX_ARAT != 0);
        let tsc_clock = has(0x8000_0007, |e| e.edx & EXT7_EDX_INVARIANT_TSC != 0);
        let mut hidden = [0; CAP_WORDS];
        if mode == HostMode::Pvm {
            let named = PVM_HIDDEN_FEATURES
                .iter()
                .map(|&(_, word, bit)| (word, bit));
            for (word, bit) in named.chain([PVM_NOXSAVE]) {
                hidden[word as usize] |= 1 << bit;
            }
        }
        GuestPlatform {
            no_legacy_pic: no_pit,
            tsc_clock,
            hidden,
        }
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.no_legacy_pic {
            flags |= FLAG_NO_LEGACY_PIC;
        }
        if self.hidden.iter().any(|&w| w != 0) {
            flags |= FLAG_FEATURES_LISTED;
        }
        if self.tsc_clock {
            flags |= FLAG_TSC_CLOCK;
        }
        // Always: husk boots only into fresh memory (see the module doc).
        flags |= FLAG_RAM_ZEROED;
        flags
    }

    /// The husk leaves, to add to every vCPU's CPUID.
    pub fn leaves(&self) -> Vec<kvm_cpuid_entry2> {
        let words = self.hidden.chunks(4);
        let last = HUSK_LEAF_BASE + 1 + words.len() as u32;
        let leaf = |function, [eax, ebx, ecx, edx]: [u32; 4]| kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let mut leaves = vec![
            leaf(
                HUSK_LEAF_BASE,
                [last, HUSK_SIGNATURE, HUSK_SIGNATURE, HUSK_SIGNATURE],
            ),
            leaf(HUSK_LEAF_BASE + 1, [self.flags(), 0, 0, 0]),
        ];
        for (n, chunk) in words.enumerate() {
            let mut regs = [0; 4];
            regs[..chunk.len()].copy_from_slice(chunk);
            leaves.push(leaf(HUSK_LEAF_BASE + 2 + n as u32, regs));
        }
        leaves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers(leaf1_ecx: u32, leaf6_eax: u32) -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: leaf1_ecx,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 6,
                eax: leaf6_eax,
                ..Default::default()
            },
        ]
    }

    /// The capability words the leaves carry, read back as the guest kernel does.
    fn read_back(leaves: &[kvm_cpuid_entry2]) -> (u32, Vec<u32>) {
        let first = leaves[0];
        assert_eq!(first.function, HUSK_LEAF_BASE);
        assert_eq!([first.ebx, first.ecx, first.edx], [HUSK_SIGNATURE; 3]);
        let sig: Vec<u8> = [first.ebx, first.ecx, first.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, b"HuskHuskHusk");
        assert_eq!(first.eax, leaves.last().unwrap().function, "highest leaf");
        let flags = leaves[1].eax;
        let words = leaves[2..]
            .iter()
            .flat_map(|e| [e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        (flags, words)
    }

    #[test]
    fn pvm_hosts_list_every_clearcpuid_feature_in_its_word() {
        let p = GuestPlatform::new(
            &timers(LEAF1_ECX_TSC_DEADLINE, LEAF6_EAX_ARAT),
            HostMode::Pvm,
        );
        let (flags, words) = read_back(&p.leaves());
        assert_eq!(
            flags,
            FLAG_NO_LEGACY_PIC | FLAG_FEATURES_LISTED | FLAG_RAM_ZEROED
        );
        assert!(words.len() >= CAP_WORDS);
        // X86_FEATURE_SMAP is 9*32+20, PCID 4*32+17, FSRM 18*32+4, XSAVES 10*32+3.
        assert_ne!(words[9] & (1 << 20), 0);
        assert_ne!(words[4] & (1 << 17), 0);
        assert_ne!(words[18] & (1 << 4), 0);
        assert_ne!(words[10] & (1 << 3), 0);
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set as usize, PVM_HIDDEN_FEATURES.len() + 1, "and XSAVE");
        assert_ne!(words[4] & (1 << 26), 0, "XSAVE, for noxsave");
    }

    #[test]
    fn the_list_is_cmdline_pvms_clearcpuid_list() {
        let pvm = super::super::cmdline::pvm_compat();
        let list = pvm
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("clearcpuid="))
            .expect("cmdline.pvm has clearcpuid=");
        let names: Vec<&str> = PVM_HIDDEN_FEATURES.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(list.split(',').collect::<Vec<_>>(), names);
    }

    #[test]
    fn other_hosts_list_nothing_and_without_deadline_or_arat_the_pic_stays() {
        let p = GuestPlatform::new(&timers(0, LEAF6_EAX_ARAT), HostMode::Hardware);
        let (flags, words) = read_back(&p.leaves());
        assert_eq!(flags, FLAG_RAM_ZEROED);
        assert!(words.iter().all(|&w| w == 0));
        assert!(!p.no_legacy_pic);
        let no_arat = GuestPlatform::new(&timers(LEAF1_ECX_TSC_DEADLINE, 0), HostMode::Hardware);
        assert!(!no_arat.no_legacy_pic);
        let both = GuestPlatform::new(
            &timers(LEAF1_ECX_TSC_DEADLINE, LEAF6_EAX_ARAT),
            HostMode::Hardware,
        );
        assert!(both.no_legacy_pic);
        assert_eq!(
            read_back(&both.leaves()).0,
            FLAG_NO_LEGACY_PIC | FLAG_RAM_ZEROED
        );
    }

    #[test]
    fn an_invariant_tsc_makes_the_tsc_the_clock() {
        let mut cpuid = timers(0, 0);
        assert!(!GuestPlatform::new(&cpuid, HostMode::Hardware).tsc_clock);
        cpuid.push(kvm_cpuid_entry2 {
            function: 0x8000_0007,
            edx: EXT7_EDX_INVARIANT_TSC,
            ..Default::default()
        });
        let p = GuestPlatform::new(&cpuid, HostMode::Hardware);
        assert!(p.tsc_clock);
        assert_eq!(read_back(&p.leaves()).0, FLAG_TSC_CLOCK | FLAG_RAM_ZEROED);
        cpuid.last_mut().unwrap().edx = 0;
        assert!(!GuestPlatform::new(&cpuid, HostMode::Hardware).tsc_clock);
    }
}
