//! CPU templates, read back from inside the guest: a tiny long-mode program executes
//! `CPUID` for a list of leaves at CPL0 and stores the four registers in guest memory; the
//! test compares what the guest saw with what each template promises, starting from what
//! KVM offers on this host (read here with `KVM_GET_SUPPORTED_CPUID` directly, not through
//! the VMM's code).
//!
//! On PVM hosts (shared/substrate.md) `KVM_SET_CPUID2` does not decide everything the
//! guest kernel sees, measured with this program: leaves 7 and 0xd come from the host CPU
//! whatever the VMM sets (identical under both templates), and in leaf 1 the host CPU's
//! bits are added to the VMM's. There the test checks leaf 1 exactly on the bits the host
//! CPU lacks (x2APIC, TSC-deadline, CX16 hidden, ...) and that every other bit the guest
//! sees is one the host CPU has (a leak, never a bit the VMM invented), and it prints,
//! rather than checks, leaves 7 and 0xd; cmdline.pvm keeps the kernel off those features.
//! Leaves 0x4000_0001 and 0x8000_00xx are checked exactly on every host.

use std::os::fd::AsRawFd;

use husk::host::HostMode;
use husk::vmm::boot::cpu_template::{
    CpuTemplate, HOST_MIN_EXT1_ECX, HOST_MIN_EXT1_EDX, HOST_MIN_KVM_FEATURES, HOST_MIN_LEAF1_ECX,
    HOST_MIN_LEAF1_EDX,
};
use husk::vmm::CpuMode;
use husk_tests::guest_asm::Asm;
use husk_tests::vmm::{raw_config, require_kvm, start, until_power_off, GuestRun};

const BASE: u64 = 0x10_0000;
/// Where the program stores the registers: 16 bytes per leaf (eax, ebx, ecx, edx).
const RESULTS: u64 = BASE + 0x800;

/// The leaves the guest reads, as (function, subleaf).
const LEAVES: [(u32, u32); 7] = [
    (0x1, 0),
    (0x7, 0),
    (0xd, 0),
    (0x4000_0000, 0),
    (0x4000_0001, 0),
    (0x8000_0001, 0),
    (0x8000_0008, 0),
];

const ECX_CX16: u32 = 1 << 13;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_XSAVEERPTR: u32 = 1 << 2;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// One CPUID result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Regs {
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
}

/// `mov eax, imm32; mov ecx, imm32; cpuid`, then the four registers to `out`.
fn emit_cpuid(a: &mut Asm, function: u32, index: u32, out: u64) {
    a.data(&[0xb8]).data(&function.to_le_bytes()); // mov eax, imm32
    a.data(&[0xb9]).data(&index.to_le_bytes()); // mov ecx, imm32
    a.data(&[0x0f, 0xa2]); // cpuid
    a.data(&[0xa3]).data(&out.to_le_bytes()); // mov [moffs64], eax
    for (offset, mov_eax_from) in [(4u64, 0xd8u8), (8, 0xc8), (12, 0xd0)] {
        a.data(&[0x89, mov_eax_from]); // mov eax, ebx / ecx / edx
        a.data(&[0xa3]).data(&(out + offset).to_le_bytes());
    }
}

/// Runs the CPUID program on one vCPU under `template` and returns what the guest saw.
fn guest_cpuid(template: CpuTemplate) -> Vec<Regs> {
    let mut a = Asm::new(BASE);
    for (i, &(function, index)) in LEAVES.iter().enumerate() {
        emit_cpuid(&mut a, function, index, RESULTS + 16 * i as u64);
    }
    a.signal_ready().power_off();
    assert!(a.here() < RESULTS, "program overlaps its results");
    let (mut config, _console) = raw_config(a.bytes, BASE, BASE, CpuMode::Long);
    config.cpu_template = template;
    let mut vm = start(config);
    let outcome = vm.wait(until_power_off());
    let run = GuestRun {
        outcome,
        console: Default::default(),
        vm,
    };
    if let Err(e) = &run.outcome {
        panic!("CPUID program under {template} failed: {e}");
    }
    (0..LEAVES.len())
        .map(|i| {
            let at = RESULTS + 16 * i as u64;
            let (lo, hi) = (run.read_u64(at), run.read_u64(at + 8));
            Regs {
                eax: lo as u32,
                ebx: (lo >> 32) as u32,
                ecx: hi as u32,
                edx: (hi >> 32) as u32,
            }
        })
        .collect()
}

/// KVM_GET_SUPPORTED_CPUID, read with the raw ioctl: (function, index) -> registers.
fn kvm_supported(function: u32, index: u32) -> Regs {
    const KVM_GET_SUPPORTED_CPUID: libc::c_ulong = 0xc008_ae05;
    const MAX: usize = 256;
    // struct kvm_cpuid2 { u32 nent; u32 padding; struct kvm_cpuid_entry2 entries[]; }
    // with 40-byte entries: function, index, flags, eax, ebx, ecx, edx, padding[3].
    let mut buf = vec![0u32; 2 + MAX * 10];
    buf[0] = MAX as u32;
    require_kvm();
    let kvm = std::fs::File::open("/dev/kvm").expect("open /dev/kvm");
    // SAFETY: `buf` is a kvm_cpuid2 header followed by room for `MAX` entries, as the
    // header's `nent` says; KVM writes at most that many entries and updates `nent`.
    let rc = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_SUPPORTED_CPUID, buf.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "KVM_GET_SUPPORTED_CPUID: {}",
        std::io::Error::last_os_error()
    );
    let count = buf[0] as usize;
    buf[2..2 + count * 10]
        .chunks(10)
        .find(|e| e[0] == function && (e[1] == index || e[2] & 1 == 0))
        .map(|e| Regs {
            eax: e[3],
            ebx: e[4],
            ecx: e[5],
            edx: e[6],
        })
        .unwrap_or_default()
}

fn seen(regs: &[Regs], function: u32, index: u32) -> Regs {
    let i = LEAVES
        .iter()
        .position(|&l| l == (function, index))
        .expect("leaf is in LEAVES");
    regs[i]
}

/// Every template shows the KVM signature, x2APIC, the hypervisor bit and XSAVEERPTR, and
/// hides CX16 (the per-vCPU normalisation under both).
fn assert_common(t: CpuTemplate, r: &[Regs]) {
    let hv = seen(r, 0x4000_0000, 0);
    let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0", "{t}: hypervisor signature");
    let leaf1 = seen(r, 0x1, 0);
    assert_eq!(leaf1.ecx & ECX_X2APIC, ECX_X2APIC, "{t}: x2APIC");
    assert_eq!(
        leaf1.ecx & ECX_HYPERVISOR,
        ECX_HYPERVISOR,
        "{t}: hypervisor bit"
    );
    assert_eq!(leaf1.ecx & ECX_CX16, 0, "{t}: CX16 must be hidden");
    assert_eq!(leaf1.ebx >> 24, 0, "{t}: APIC id of vCPU 0");
    let ext8 = seen(r, 0x8000_0008, 0);
    assert_eq!(ext8.ebx & EBX_XSAVEERPTR, EBX_XSAVEERPTR, "{t}: XSAVEERPTR");
}

/// The host CPU's own CPUID (what a PVM guest kernel sees for the leaves PVM passes through).
fn native(function: u32, index: u32) -> Regs {
    let r = std::arch::x86_64::__cpuid_count(function, index);
    Regs {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Leaf 1, to which PVM adds the host CPU's feature bits.
fn pvm_merges_host_bits(function: u32) -> bool {
    HostMode::detect() == HostMode::Pvm && function == 0x1
}

/// Leaves PVM takes from the host CPU whatever the VMM sets.
fn pvm_replaces_with_host(function: u32) -> bool {
    HostMode::detect() == HostMode::Pvm && matches!(function, 0x7 | 0xd)
}

/// Checks one register of one leaf: exactly, or on PVM's pass-through leaves, exactly on
/// the bits the host CPU lacks and never a bit outside `expected | native`.
fn assert_reg(t: CpuTemplate, what: &str, function: u32, seen: u32, expected: u32, native: u32) {
    if pvm_replaces_with_host(function) {
        eprintln!("{t}: {what}: not checked: PVM shows the host CPU's {seen:#x} (template: {expected:#x})");
    } else if pvm_merges_host_bits(function) {
        assert_eq!(
            seen & !native,
            expected & !native,
            "{t}: {what}: bits the host CPU lacks: seen {seen:#x}, expected {expected:#x}"
        );
        let leaked = seen & !expected;
        if leaked != 0 {
            eprintln!("{t}: {what}: PVM passes host bits {leaked:#x} through");
        }
    } else {
        assert_eq!(
            seen, expected,
            "{t}: {what}: seen {seen:#x}, expected {expected:#x}"
        );
    }
}

/// Compares the four registers of a leaf.
fn assert_leaf(t: CpuTemplate, r: &[Regs], function: u32, index: u32, expected: Regs) {
    let (s, n) = (seen(r, function, index), native(function, index));
    let name = |reg| format!("leaf {function:#x}.{index} {reg}");
    assert_reg(t, &name("eax"), function, s.eax, expected.eax, n.eax);
    assert_reg(t, &name("ebx"), function, s.ebx, expected.ebx, n.ebx);
    assert_reg(t, &name("ecx"), function, s.ecx, expected.ecx, n.ecx);
    assert_reg(t, &name("edx"), function, s.edx, expected.edx, n.edx);
}

/// What every template does to leaf 1 ECX: x2APIC and hypervisor shown, CX16 hidden.
fn normalised_leaf1_ecx(v: u32) -> u32 {
    (v | ECX_X2APIC | ECX_HYPERVISOR) & !ECX_CX16
}

/// Leaf 1 EBX for vCPU 0 of 1: APIC id 0, one logical processor, 64-byte CLFLUSH lines.
const LEAF1_EBX_ONE_VCPU: u32 = (1 << 16) | (8 << 8);

#[test]
fn host_template_shows_the_guest_what_kvm_supports() {
    let t = CpuTemplate::Host;
    let r = guest_cpuid(t);
    assert_common(t, &r);
    let kvm1 = kvm_supported(0x1, 0);
    let leaf1 = Regs {
        ebx: LEAF1_EBX_ONE_VCPU | (kvm1.ebx & 0xff),
        ecx: normalised_leaf1_ecx(kvm1.ecx),
        ..kvm1
    };
    assert_leaf(t, &r, 0x1, 0, leaf1);
    for (function, index) in [(0x7, 0), (0xd, 0), (0x4000_0001, 0), (0x8000_0001, 0)] {
        assert_leaf(t, &r, function, index, kvm_supported(function, index));
    }
}

#[test]
fn host_min_template_shows_only_its_allowlist() {
    let t = CpuTemplate::HostMin;
    let r = guest_cpuid(t);
    assert_common(t, &r);
    let kvm1 = kvm_supported(0x1, 0);
    let leaf1 = Regs {
        ebx: LEAF1_EBX_ONE_VCPU | (kvm1.ebx & 0xff),
        ecx: normalised_leaf1_ecx(kvm1.ecx) & HOST_MIN_LEAF1_ECX,
        edx: kvm1.edx & HOST_MIN_LEAF1_EDX,
        ..kvm1
    };
    assert_leaf(t, &r, 0x1, 0, leaf1);
    let leaf7 = Regs {
        eax: kvm_supported(0x7, 0).eax,
        ..Regs::default()
    };
    assert_leaf(t, &r, 0x7, 0, leaf7);
    assert_leaf(t, &r, 0xd, 0, Regs::default());
    let kvm_features = Regs {
        eax: kvm_supported(0x4000_0001, 0).eax & HOST_MIN_KVM_FEATURES,
        ..Regs::default()
    };
    assert_leaf(t, &r, 0x4000_0001, 0, kvm_features);
    assert_ne!(
        seen(&r, 0x4000_0001, 0).eax & KVM_FEATURE_CLOCKSOURCE2,
        0,
        "kvm-clock stays"
    );
    let kvm_ext1 = kvm_supported(0x8000_0001, 0);
    let ext1 = Regs {
        ecx: kvm_ext1.ecx & HOST_MIN_EXT1_ECX,
        edx: kvm_ext1.edx & HOST_MIN_EXT1_EDX,
        ..kvm_ext1
    };
    assert_leaf(t, &r, 0x8000_0001, 0, ext1);
    assert_eq!(
        seen(&r, 0x8000_0008, 0).ebx,
        EBX_XSAVEERPTR,
        "ext leaf 8 ebx: XSAVEERPTR only"
    );
}
