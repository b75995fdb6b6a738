//! The CPU state a vCPU starts in: long mode with identity page tables (Linux's 64-bit
//! boot protocol), or plain real mode for small test programs. Also the FPU and the
//! local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::memory::{BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START};

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RegsError {
    /// writing the boot GDT/IDT/page tables into guest memory failed: {0}
    WriteTables(vm_memory::GuestMemoryError),
    /// {what} ioctl failed: {source}
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PTE_HUGE: u64 = 0x80;
/// Bit 1 of RFLAGS is reserved and always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Boot GDT selectors (index * 8).
pub const GDT_CODE_SELECTOR: u16 = 1 << 3;
pub const GDT_DATA_SELECTOR: u16 = 2 << 3;
pub const GDT_TSS_SELECTOR: u16 = 3 << 3;

/// Packs a segment descriptor from flags (type/S/DPL/P in bits 0..8, AVL/L/D/G in 12..16),
/// base and limit, as the CPU reads it from the GDT.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS (the TSS is only there because VMX
/// refuses to enter a guest with an unusable task register).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, execute/read, accessed, L=1, G=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, accessed, D/B=1, G=1
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS, G=1
];

/// The `kvm_segment` the CPU would cache after loading `selector` from `entry`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first 1 GiB with
/// 2 MiB pages (Linux's startup_64 replaces them as soon as it runs).
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteTables)?;
    // Present | writable | user at every level, plus PS (2 MiB page) in the directory.
    // The user bit lets test programs run at CPL3; Linux replaces these tables at once.
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW_USER, GuestAddress(PML4_START))
        .map_err(RegsError::WriteTables)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW_USER, GuestAddress(PDPTE_START))
        .map_err(RegsError::WriteTables)?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PTE_PRESENT_RW_USER | PTE_HUGE,
            GuestAddress(PDE_START + i * 8),
        )
        .map_err(RegsError::WriteTables)?;
    }
    Ok(())
}

/// Special registers for 64-bit long mode with paging on the boot tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], GDT_CODE_SELECTOR);
    let data = segment_from_gdt(BOOT_GDT[2], GDT_DATA_SELECTOR);
    let tss = segment_from_gdt(BOOT_GDT[3], GDT_TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for real mode with flat segments at 0, so `entry` is a linear address
/// below 64 KiB.
pub fn real_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    sregs
}

/// General registers at entry: Linux wants the zero page in rsi.
pub fn boot_regs(entry: u64, stack: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi: zero_page,
        ..Default::default()
    }
}

/// x87 control word and SSE control/status as after FNINIT and a reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires the local APIC as a PC does (virtual wire mode): LINT0 takes the 8259's ExtINT,
/// LINT1 takes NMI. Linux expects this before it switches to the IOAPIC.
pub fn configure_lapic_lints(lapic: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode, flat segments at 0.
    Real,
    /// 64-bit long mode at CPL0 on the boot page tables.
    Long,
}

/// Loads the boot state into the first vCPU.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mode: CpuMode,
    entry: u64,
    zero_page: u64,
) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let (sregs, stack) = match mode {
        CpuMode::Long => (
            long_mode_sregs(sregs),
            crate::vmm::memory::BOOT_STACK_POINTER,
        ),
        CpuMode::Real => (real_mode_sregs(sregs), 0x7000),
    };
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry, stack, zero_page))
        .map_err(ioctl("KVM_SET_REGS"))?;
    Ok(())
}

/// FPU and LAPIC setup shared by every vCPU.
pub fn setup_fpu_and_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(ioctl("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    configure_lapic_lints(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], GDT_CODE_SELECTOR);
        assert_eq!(
            (code.base, code.limit, code.l, code.db, code.dpl),
            (0, 0xffff_ffff, 1, 0, 0)
        );
        assert_eq!((code.type_, code.s, code.present, code.g), (0xb, 1, 1, 1));
        let data = segment_from_gdt(BOOT_GDT[2], GDT_DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        let tss = segment_from_gdt(BOOT_GDT[3], GDT_TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_64bit() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.gdt.base, BOOT_GDT_START);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_long_mode_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 7);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x87);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn lapic_lints_become_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0000); // masked, fixed mode
        configure_lapic_lints(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x400);
    }
}
