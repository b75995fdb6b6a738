//! Tiny hand-written guest programs run through the real VMM and /dev/kvm: they prove the
//! vCPU setup (real mode, long mode at CPL0 and CPL3), the port bus, the serial console,
//! the boot timer, the i8042 power-off, pause/resume, and the error paths.
//!
//! On PVM hosts (shared/substrate.md) CPL0 code is emulated and CPL3 code runs natively;
//! where the two hosts differ the test says which behaviour it expects and why.

use std::time::{Duration, Instant};

use husk::host::HostMode;
use husk::vmm::vcpu::VcpuStop;
use husk::vmm::{CpuMode, GuestExit, RunError, RunOptions};
use husk_tests::guest_asm::{
    interrupt_gate, pseudo_descriptor, segment_descriptor, tss_descriptor, Asm,
};
use husk_tests::vmm::{raw_config, run_raw, start, until_power_off};
use vm_memory::{Bytes, GuestAddress};

/// Long-mode programs load at 1 MiB, inside the VMM's identity-mapped first gigabyte.
const LONG_BASE: u64 = 0x10_0000;
/// Real-mode programs load below the zero page.
const REAL_BASE: u64 = 0x1000;

fn assert_powered_off_after_ready(run: &husk_tests::vmm::GuestRun) {
    let outcome = run
        .outcome
        .as_ref()
        .unwrap_or_else(|e| panic!("guest failed: {e}\nconsole: {:?}", run.console_text()));
    assert_eq!(outcome.exit, GuestExit::PowerOff);
    assert!(
        outcome.ready_after.is_some(),
        "the boot timer must have seen the ready write"
    );
}

#[test]
fn real_mode_program_writes_serial_and_the_boot_timer() {
    let mut a = Asm::new(REAL_BASE);
    a.real_mov_dx(0x3f8);
    for b in b"real mode\n" {
        a.mov_al(*b).out_dx_al();
    }
    a.real_mov_dx(husk_protocol::boot::READY_PORT)
        .mov_al(husk_protocol::boot::READY_MAGIC)
        .out_dx_al()
        .power_off();
    let run = run_raw(a.bytes, REAL_BASE, CpuMode::Real, until_power_off());
    assert_powered_off_after_ready(&run);
    assert_eq!(run.console_text(), "real mode\n");
}

#[test]
fn long_mode_program_at_cpl0_runs_64bit_code() {
    const RESULT: u64 = LONG_BASE + 0x800;
    let mut a = Asm::new(LONG_BASE);
    // A 64-bit immediate and store only decode this way in long mode.
    a.mov_rax(0x1122_3344_5566_7788)
        .store_rax(RESULT)
        .print("long mode\n")
        .signal_ready()
        .power_off();
    let run = run_raw(a.bytes, LONG_BASE, CpuMode::Long, until_power_off());
    assert_powered_off_after_ready(&run);
    assert_eq!(run.console_text(), "long mode\n");
    assert_eq!(run.read_u64(RESULT), 0x1122_3344_5566_7788);
}

/// The CPL3 program's layout (offsets from LONG_BASE).
mod cpl3 {
    pub const USER_CODE: usize = 0x200;
    pub const INT80_HANDLER: usize = 0x280;
    pub const UD_HANDLER: usize = 0x300;
    pub const GP_HANDLER: usize = 0x380;
    pub const PF_HANDLER: usize = 0x3c0;
    pub const GDT: usize = 0x400;
    pub const GDTR: usize = 0x440;
    pub const IDTR: usize = 0x450;
    pub const TSS: usize = 0x500;
    pub const IDT: usize = 0x600;
    pub const IDT_ENTRIES: usize = 0x81;
    pub const USER_CS: u64 = 0xf00;
    pub const KERNEL_CS: u64 = 0xf08;
    pub const FRAME_CS: u64 = 0xf10;
    pub const MARKER: u64 = 0xf18;
    pub const FAULT_RIP: u64 = 0xf20;
    pub const FAULT_ERR: u64 = 0xf28;
    pub const END: usize = 0xf30;
    pub const KERNEL_STACK: u64 = 0x2000;
    pub const USER_STACK: u64 = 0x3000;
    pub const KERNEL_CODE_SEL: u16 = 0x08;
    pub const USER_DATA_SEL: u32 = 0x18 | 3;
    pub const USER_CODE_SEL: u32 = 0x20 | 3;
    pub const TSS_SEL: u16 = 0x28;
    pub const VECTOR_UD: usize = 6;
    pub const VECTOR_GP: usize = 13;
    pub const VECTOR_PF: usize = 14;
    pub const VECTOR_INT80: usize = 0x80;
}

/// How the CPL3 part of the program returns to CPL0.
#[derive(Clone, Copy)]
enum BackToCpl0 {
    /// `ud2`: an invalid-opcode exception.
    Ud2,
    /// `int 0x80` through a DPL3 interrupt gate.
    Int80,
}

/// The CPL0 handler that ends the program: records its CS and the interrupted CS, says
/// which gate it came through, signals ready and powers off.
fn return_handler(a: &mut Asm, name: &str) {
    let at = |off: u64| LONG_BASE + off;
    a.store_cs(at(cpl3::KERNEL_CS))
        .load_rax_from_stack(8) // CS in the frame (no error code for #UD or int)
        .store_rax(at(cpl3::FRAME_CS))
        .print(&format!("cpl0: {name}\n"))
        .signal_ready()
        .power_off();
}

/// A program that loads its own GDT (with DPL3 segments and a TSS) and IDT, drops to
/// CPL3 with iretq (IOPL=3), writes memory there (and with `user_port_io` the serial
/// port), then returns to CPL0 as `back` says. #GP and #PF handlers record the faulting
/// rip and error code and print which fault it was.
fn cpl3_program(user_port_io: bool, back: BackToCpl0) -> Vec<u8> {
    use cpl3::*;
    let at = |off: u64| LONG_BASE + off;
    let mut a = Asm::new(LONG_BASE);
    // CPL0: own descriptor tables, then an iretq frame for CPL3.
    a.lgdt(at(GDTR as u64)).lidt(at(IDTR as u64)).ltr(TSS_SEL);
    a.push_imm(USER_DATA_SEL) // SS
        .mov_rax(at(USER_STACK))
        .push_rax() // RSP
        .push_imm(0x3002) // RFLAGS: IOPL=3, reserved bit 1, interrupts off
        .push_imm(USER_CODE_SEL) // CS
        .mov_rax(at(USER_CODE as u64))
        .push_rax() // RIP
        .iretq();
    // CPL3: record CS, write a marker, maybe use a port, go back to CPL0.
    a.pad_to(USER_CODE);
    a.store_cs(at(USER_CS))
        .mov_rax(0xcafe)
        .store_rax(at(MARKER));
    if user_port_io {
        a.print("cpl3\n");
    }
    match back {
        BackToCpl0::Ud2 => a.ud2(),
        BackToCpl0::Int80 => a.int(VECTOR_INT80 as u8),
    };
    a.spin();
    a.pad_to(INT80_HANDLER);
    return_handler(&mut a, "int 0x80");
    a.pad_to(UD_HANDLER);
    return_handler(&mut a, "#UD");
    for (offset, name) in [(GP_HANDLER, "#GP\n"), (PF_HANDLER, "#PF\n")] {
        a.pad_to(offset);
        a.load_rax_from_stack(8) // faulting RIP (above the error code)
            .store_rax(at(FAULT_RIP))
            .load_rax_from_stack(0) // error code
            .store_rax(at(FAULT_ERR))
            .print(name)
            .power_off();
    }
    a.pad_to(GDT);
    let tss = tss_descriptor(at(TSS as u64));
    for entry in [
        0,
        segment_descriptor(true, 0),
        segment_descriptor(false, 0),
        segment_descriptor(false, 3),
        segment_descriptor(true, 3),
        tss[0],
        tss[1],
    ] {
        a.data(&entry.to_le_bytes());
    }
    a.pad_to(GDTR)
        .data(&pseudo_descriptor(at(GDT as u64), 7 * 8));
    a.pad_to(IDTR)
        .data(&pseudo_descriptor(at(IDT as u64), IDT_ENTRIES * 16));
    a.pad_to(TSS)
        .data(&[0; 4])
        .data(&at(KERNEL_STACK).to_le_bytes()); // RSP0
    a.pad_to(IDT);
    for vector in 0..IDT_ENTRIES {
        let gate = match vector {
            VECTOR_UD => interrupt_gate(at(UD_HANDLER as u64), KERNEL_CODE_SEL, 0),
            VECTOR_GP => interrupt_gate(at(GP_HANDLER as u64), KERNEL_CODE_SEL, 0),
            VECTOR_PF => interrupt_gate(at(PF_HANDLER as u64), KERNEL_CODE_SEL, 0),
            VECTOR_INT80 => interrupt_gate(at(INT80_HANDLER as u64), KERNEL_CODE_SEL, 3),
            _ => [0; 16],
        };
        a.data(&gate);
    }
    a.pad_to(END);
    a.bytes
}

/// Runs a CPL3 program and checks what every variant must show: the user code ran at
/// CPL3 and the handler ran at CPL0 with a CPL3 frame.
fn run_cpl3(user_port_io: bool, back: BackToCpl0) -> (husk_tests::vmm::GuestRun, String) {
    use cpl3::*;
    let run = run_raw(
        cpl3_program(user_port_io, back),
        LONG_BASE,
        CpuMode::Long,
        until_power_off(),
    );
    let console = run.console_text();
    let data: Vec<u64> = (0..6)
        .map(|i| run.read_u64(LONG_BASE + USER_CS + 8 * i))
        .collect();
    let context = format!("console {console:?}, data {data:#x?}, {:?}", run.outcome);
    // CS as the user code read it: CPL3. (On PVM the selector is the host's user CS,
    // 0x33, because guest user code runs natively; on hardware it is ours, 0x23.)
    assert_eq!(run.read_u64(LONG_BASE + USER_CS) & 3, 3, "{context}");
    assert_eq!(run.read_u64(LONG_BASE + MARKER), 0xcafe, "{context}");
    (run, context)
}

fn assert_returned_to_cpl0(run: &husk_tests::vmm::GuestRun, context: &str) {
    use cpl3::*;
    assert_eq!(
        run.read_u64(LONG_BASE + FRAME_CS) & 3,
        3,
        "frame CS: {context}"
    );
    assert_eq!(
        run.read_u64(LONG_BASE + KERNEL_CS) & 0xffff,
        u64::from(KERNEL_CODE_SEL),
        "{context}"
    );
    assert_powered_off_after_ready(run);
}

#[test]
fn long_mode_program_drops_to_cpl3_and_returns_through_an_exception_gate() {
    let (run, context) = run_cpl3(false, BackToCpl0::Ud2);
    assert_eq!(run.console_text(), "cpl0: #UD\n", "{context}");
    assert_returned_to_cpl0(&run, &context);
}

/// `int 0x80` at CPL3. On VT-x/AMD-V it goes through the DPL3 gate. On PVM hosts guest
/// user code runs natively and the software interrupt never reaches the guest's gate:
/// it arrives as #UD (measured: with only the #UD gate present the program still
/// returns, without it the guest triple-faults). Guest user space must use `syscall`.
#[test]
fn int_0x80_at_cpl3_uses_its_gate_on_hardware_and_arrives_as_ud_on_pvm() {
    let (run, context) = run_cpl3(false, BackToCpl0::Int80);
    let expected = match HostMode::detect() {
        HostMode::Pvm => "cpl0: #UD\n",
        HostMode::Hardware => "cpl0: int 0x80\n",
        HostMode::NoKvm => unreachable!("run_raw requires KVM"),
    };
    assert_eq!(run.console_text(), expected, "{context}");
    assert_returned_to_cpl0(&run, &context);
}

/// Port I/O at CPL3 with IOPL=3. On VT-x/AMD-V it reaches the VMM. On PVM hosts guest user
/// code runs natively in host ring 3, where the host's IOPL (0) applies, not the guest's:
/// the `out` raises #GP (error code 0) in the guest instead. This is why the agent signals
/// ready through /dev/port (the guest kernel performs the `out`) and not from user space.
#[test]
fn port_io_at_cpl3_with_iopl3_works_on_hardware_and_faults_on_pvm() {
    use cpl3::*;
    let (run, context) = run_cpl3(true, BackToCpl0::Ud2);
    match HostMode::detect() {
        HostMode::Pvm => {
            assert_eq!(run.console_text(), "#GP\n", "{context}");
            // store_cs (13 bytes), mov rax (10), store (10), mov dx (4), mov al (2): out.
            let first_out = LONG_BASE + USER_CODE as u64 + 13 + 10 + 10 + 4 + 2;
            assert_eq!(run.read_u64(LONG_BASE + FAULT_RIP), first_out, "{context}");
            assert_eq!(run.read_u64(LONG_BASE + FAULT_ERR), 0, "{context}");
            let outcome = run.outcome.as_ref().expect("the #GP handler powers off");
            assert_eq!(outcome.exit, GuestExit::PowerOff);
        }
        HostMode::Hardware => {
            assert_eq!(run.console_text(), "cpl3\ncpl0: #UD\n", "{context}");
            assert_returned_to_cpl0(&run, &context);
        }
        HostMode::NoKvm => unreachable!("run_raw requires KVM"),
    }
}

#[test]
fn until_ready_stops_a_guest_that_keeps_running() {
    let mut a = Asm::new(LONG_BASE);
    a.signal_ready().spin();
    let opts = RunOptions {
        until_ready: true,
        ready_timeout: Some(Duration::from_secs(30)),
    };
    let run = run_raw(a.bytes, LONG_BASE, CpuMode::Long, opts);
    let outcome = run.outcome.expect("guest signalled ready");
    assert_eq!(outcome.exit, GuestExit::Ready);
    assert!(outcome.ready_after.unwrap() < Duration::from_secs(30));
}

#[test]
fn a_guest_that_never_becomes_ready_times_out_with_a_clear_error() {
    let mut a = Asm::new(LONG_BASE);
    a.spin();
    let t0 = Instant::now();
    let opts = RunOptions {
        until_ready: false,
        ready_timeout: Some(Duration::from_secs(1)),
    };
    let run = run_raw(a.bytes, LONG_BASE, CpuMode::Long, opts);
    let err = run.outcome.expect_err("a spinning guest is never ready");
    assert!(matches!(err, RunError::NotReady(_)), "{err}");
    assert!(err.to_string().contains("--timeout"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "vCPU threads must stop promptly"
    );
}

#[test]
fn a_triple_fault_ends_the_vm_with_an_error_naming_it() {
    let mut a = Asm::new(LONG_BASE);
    // The VMM's boot IDT is empty: #UD -> #GP -> #DF -> triple fault.
    a.print("x").ud2();
    let run = run_raw(a.bytes, LONG_BASE, CpuMode::Long, until_power_off());
    let console = run.console_text();
    let err = run.outcome.expect_err("a triple fault is not a power-off");
    match &err {
        RunError::VcpuFailed {
            index: 0,
            reason: VcpuStop::Shutdown,
            ..
        } => {}
        other => panic!("expected a shutdown exit, got: {other}"),
    }
    assert!(err.to_string().contains("triple fault"), "{err}");
    assert_eq!(console, "x");
}

#[test]
fn an_instruction_the_host_cannot_emulate_is_reported_with_rip_and_bytes() {
    let mut a = Asm::new(LONG_BASE);
    a.print("p");
    let popcnt_at = a.here();
    a.popcnt_rax().signal_ready().power_off();
    let run = run_raw(a.bytes, LONG_BASE, CpuMode::Long, until_power_off());
    match HostMode::detect() {
        // PVM emulates CPL0 and its emulator lacks popcnt (shared/substrate.md).
        HostMode::Pvm => {
            let err = run.outcome.expect_err("PVM cannot emulate popcnt at CPL0");
            let RunError::VcpuFailed {
                reason: VcpuStop::InternalError(info),
                ..
            } = &err
            else {
                panic!("expected an emulation failure, got: {err}");
            };
            assert_eq!(info.rip, popcnt_at, "{err}");
            assert_eq!(&info.instruction[..4], &[0xf3, 0x48, 0x0f, 0xb8], "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("rip 0x10") && msg.contains("f3 48 0f b8"),
                "{msg}"
            );
            assert!(msg.contains("System.map"), "{msg}");
        }
        // With VT-x/AMD-V the instruction runs natively.
        HostMode::Hardware => assert_powered_off_after_ready(&run),
        HostMode::NoKvm => unreachable!("run_raw requires KVM"),
    }
}

#[test]
fn pause_holds_the_vcpu_and_resume_lets_it_continue() {
    const COUNTER: u64 = LONG_BASE + 0x800;
    let mut a = Asm::new(LONG_BASE);
    let top = a.here();
    a.load_rax(COUNTER).inc_rax().store_rax(COUNTER).jmp_to(top);
    let (config, _console) = raw_config(a.bytes, LONG_BASE, LONG_BASE, CpuMode::Long);
    let vm = start(config);
    let counter = || -> u64 { vm.memory().read_obj(GuestAddress(COUNTER)).unwrap() };
    let wait_past = |floor: u64| {
        let t0 = Instant::now();
        while counter() <= floor {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "guest counter stuck at {floor}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_past(0);
    vm.pause().expect("pause");
    let held = counter();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(), held, "a paused vCPU must not run");
    vm.resume().expect("resume");
    wait_past(held);
}

/// The daemon's path: `wait` runs on the VM's own thread and another thread pauses and
/// resumes it through a [`husk::vmm::VmPauseHandle`].
#[test]
fn a_pause_handle_silences_a_waiting_vm_until_resume_and_a_paused_vm_stops() {
    let mut a = Asm::new(LONG_BASE);
    let top = a.here();
    a.print(".").jmp_to(top);
    let (config, console) = raw_config(a.bytes, LONG_BASE, LONG_BASE, CpuMode::Long);
    let mut vm = start(config);
    let pause = vm.pause_handle();
    let stop = vm.stop_handle().expect("stop handle");
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = vm.wait(RunOptions::default());
        drop(vm);
        let _ = done_tx.send(result);
    });
    let printed = || console.contents().len();
    let wait_past = |floor: usize| {
        let t0 = Instant::now();
        while printed() <= floor {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "console output stuck at {floor} bytes"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_past(0);
    pause.pause().expect("pause");
    let held = printed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(printed(), held, "a paused VM must not print");
    pause.resume().expect("resume");
    wait_past(held);
    pause.pause().expect("pause again");
    stop.stop().expect("stop");
    let outcome = done
        .recv_timeout(Duration::from_secs(20))
        .expect("a paused VM must stop promptly")
        .expect("the VM ran");
    assert_eq!(outcome.exit, GuestExit::Stopped);
    let err = pause.resume().expect_err("the VM is gone");
    assert!(matches!(err, RunError::NotRunning), "{err}");
}
