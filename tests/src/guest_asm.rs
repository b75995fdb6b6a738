//! A few x86 instructions, hand-encoded, for the tiny guest programs the VMM tests run.
//!
//! Each method emits one instruction; its doc comment is the assembly it stands for, so a
//! test program reads as a listing. The encodings are proven by the tests that run them
//! (tests/tests/vmm_guest_programs.rs): a wrong byte shows up as a wrong result.

/// A program being assembled at a known guest address.
#[derive(Debug, Clone)]
pub struct Asm {
    /// Guest address of byte 0.
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl Asm {
    pub fn new(base: u64) -> Self {
        Self {
            base,
            bytes: Vec::new(),
        }
    }

    /// Guest address of the next instruction.
    pub fn here(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// Pads with zeros up to offset `offset` (data areas, alignment).
    pub fn pad_to(&mut self, offset: usize) -> &mut Self {
        assert!(
            self.bytes.len() <= offset,
            "code overruns offset {offset:#x}"
        );
        self.bytes.resize(offset, 0);
        self
    }

    /// Raw data.
    pub fn data(&mut self, bytes: &[u8]) -> &mut Self {
        self.emit(bytes)
    }

    // ---- 16-bit real mode ----

    /// `mov dx, imm16` (real mode: operand size is 16 by default).
    pub fn real_mov_dx(&mut self, v: u16) -> &mut Self {
        let [lo, hi] = v.to_le_bytes();
        self.emit(&[0xba, lo, hi])
    }

    // ---- either mode ----

    /// `mov al, imm8`
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.emit(&[0xb0, v])
    }

    /// `out dx, al`
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.emit(&[0xee])
    }

    /// `out imm8, al`
    pub fn out_imm_al(&mut self, port: u8) -> &mut Self {
        self.emit(&[0xe6, port])
    }

    /// `jmp $` (spin forever)
    pub fn spin(&mut self) -> &mut Self {
        self.emit(&[0xeb, 0xfe])
    }

    /// `ud2` (raise #UD)
    pub fn ud2(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x0b])
    }

    // ---- 64-bit long mode ----

    /// `mov dx, imm16` (64-bit mode: operand-size prefix 0x66)
    pub fn mov_dx(&mut self, v: u16) -> &mut Self {
        let [lo, hi] = v.to_le_bytes();
        self.emit(&[0x66, 0xba, lo, hi])
    }

    /// `mov rax, imm64`
    pub fn mov_rax(&mut self, v: u64) -> &mut Self {
        self.emit(&[0x48, 0xb8]).emit(&v.to_le_bytes())
    }

    /// `mov [moffs64], rax`
    pub fn store_rax(&mut self, addr: u64) -> &mut Self {
        self.emit(&[0x48, 0xa3]).emit(&addr.to_le_bytes())
    }

    /// `mov rax, [moffs64]`
    pub fn load_rax(&mut self, addr: u64) -> &mut Self {
        self.emit(&[0x48, 0xa1]).emit(&addr.to_le_bytes())
    }

    /// `inc rax`
    pub fn inc_rax(&mut self) -> &mut Self {
        self.emit(&[0x48, 0xff, 0xc0])
    }

    /// `jmp rel8` back to guest address `target`
    pub fn jmp_to(&mut self, target: u64) -> &mut Self {
        let rel = target as i64 - (self.here() as i64 + 2);
        self.emit(&[0xeb, i8::try_from(rel).expect("jump too far") as u8])
    }

    /// `mov ax, cs` then `mov [moffs64], ax`: records the current code selector, whose
    /// low two bits are the CPL.
    pub fn store_cs(&mut self, addr: u64) -> &mut Self {
        self.emit(&[0x66, 0x8c, 0xc8]); // mov ax, cs
        self.emit(&[0x66, 0xa3]).emit(&addr.to_le_bytes()) // mov [moffs64], ax
    }

    /// `mov rax, [rsp + disp8]`
    pub fn load_rax_from_stack(&mut self, disp: u8) -> &mut Self {
        self.emit(&[0x48, 0x8b, 0x44, 0x24, disp])
    }

    /// `lgdt [moffs]` via `mov rax, imm64; lgdt [rax]`
    pub fn lgdt(&mut self, pseudo_descriptor: u64) -> &mut Self {
        self.mov_rax(pseudo_descriptor);
        self.emit(&[0x0f, 0x01, 0x10]) // lgdt [rax]
    }

    /// `lidt [rax]` after `mov rax, imm64`
    pub fn lidt(&mut self, pseudo_descriptor: u64) -> &mut Self {
        self.mov_rax(pseudo_descriptor);
        self.emit(&[0x0f, 0x01, 0x18]) // lidt [rax]
    }

    /// `mov ax, imm16; ltr ax`
    pub fn ltr(&mut self, selector: u16) -> &mut Self {
        let [lo, hi] = selector.to_le_bytes();
        self.emit(&[0x66, 0xb8, lo, hi]); // mov ax, imm16
        self.emit(&[0x0f, 0x00, 0xd8]) // ltr ax
    }

    /// `push imm32` (sign-extended to 64 bits)
    pub fn push_imm(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x68]).emit(&v.to_le_bytes())
    }

    /// `push rax`
    pub fn push_rax(&mut self) -> &mut Self {
        self.emit(&[0x50])
    }

    /// `iretq`
    pub fn iretq(&mut self) -> &mut Self {
        self.emit(&[0x48, 0xcf])
    }

    /// `int imm8`
    pub fn int(&mut self, vector: u8) -> &mut Self {
        self.emit(&[0xcd, vector])
    }

    /// `popcnt rax, rax` (PVM's instruction emulator lacks it)
    pub fn popcnt_rax(&mut self) -> &mut Self {
        self.emit(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0])
    }

    // ---- composed sequences ----

    /// Writes `text` to COM1 (long mode).
    pub fn print(&mut self, text: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in text.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }

    /// Writes husk's ready magic to the boot-timer port (long mode).
    pub fn signal_ready(&mut self) -> &mut Self {
        self.mov_dx(husk_protocol::boot::READY_PORT)
            .mov_al(husk_protocol::boot::READY_MAGIC)
            .out_dx_al()
    }

    /// Resets through the i8042 (the VMM's power-off), then spins.
    pub fn power_off(&mut self) -> &mut Self {
        self.mov_al(0xfe).out_imm_al(0x64).spin()
    }
}

/// A 64-bit code or data segment descriptor with privilege `dpl`.
pub fn segment_descriptor(code: bool, dpl: u8) -> u64 {
    // type: execute/read (0xb) or read/write (0x3), accessed; S=1; P=1.
    let access: u64 = 0x90 | (u64::from(dpl) << 5) | if code { 0xb } else { 0x3 };
    // code: L=1, G=1; data: D/B=1, G=1. Flat 4 GiB limit.
    let flags: u64 = if code { 0xa } else { 0xc };
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The two 8-byte halves of an available 64-bit TSS descriptor for a TSS at `base`.
pub fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = 0x67u64;
    let low = limit | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// A 64-bit interrupt gate to `handler` in code segment `selector`, callable from `dpl`.
pub fn interrupt_gate(handler: u64, selector: u16, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[5] = 0x8e | (dpl << 5); // present, interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// A pseudo-descriptor for `lgdt`/`lidt`: 16-bit limit, 64-bit base.
pub fn pseudo_descriptor(base: u64, len: usize) -> [u8; 10] {
    let mut d = [0u8; 10];
    d[0..2].copy_from_slice(&((len - 1) as u16).to_le_bytes());
    d[2..10].copy_from_slice(&base.to_le_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_values() {
        assert_eq!(segment_descriptor(true, 0), 0x00af_9b00_0000_ffff);
        assert_eq!(segment_descriptor(false, 0), 0x00cf_9300_0000_ffff);
        assert_eq!(segment_descriptor(true, 3), 0x00af_fb00_0000_ffff);
        assert_eq!(segment_descriptor(false, 3), 0x00cf_f300_0000_ffff);
        assert_eq!(
            tss_descriptor(0x12_3456_789a),
            [0x3400_8956_789a_0067, 0x12]
        );
    }

    #[test]
    fn jumps_are_relative_to_the_next_instruction() {
        let mut a = Asm::new(0x1000);
        a.spin();
        a.jmp_to(0x1000);
        assert_eq!(a.bytes, vec![0xeb, 0xfe, 0xeb, 0xfc]);
    }
}
