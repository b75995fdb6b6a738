//! Snapshot and restore with tiny guest programs through the real VMM and /dev/kvm.
//!
//! The program counts in `rax` and in memory, checks the two agree on every iteration,
//! prints a dot every 4096 counts, and stops when the count reaches the limit the host
//! keeps in guest memory. A snapshot is taken while it runs; restored VMs are given their
//! own limit and input, so what each prints and writes proves that it continued from the
//! snapshot (registers and memory) and that its memory is its own.

use std::path::Path;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use husk::vmm::snapshot::{SnapshotError, FORMAT_VERSION};
use husk::vmm::{
    BuildError, CpuMode, GuestExit, RunOptions, SharedBuffer, Vm, VmBuilder, VmConfig,
};
use husk_tests::guest_asm::Asm;
use husk_tests::vmm::{raw_config, require_kvm};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
/// The program's data: the counter, then what the host sets and reads.
const DATA: u64 = 0x10_1000;
const COUNTER: u64 = DATA;
const LIMIT: u64 = DATA + 8;
const INPUT: u64 = DATA + 16;
const TARGET: u64 = DATA + 24;
const RESULT: u64 = DATA + 32;
/// How far a restored VM counts past the snapshot.
const MORE: u64 = 5000;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The counting program (see the module comment). Encodings not in `Asm` are spelled out.
fn counter_program() -> Vec<u8> {
    let mut a = Asm::new(CODE);
    a.data(&[0x48, 0xbb]).data(&DATA.to_le_bytes()); // mov rbx, DATA
    a.print("start\n");
    a.data(&[0x31, 0xc0]); // xor eax, eax
    let top = a.here();
    a.inc_rax();
    a.data(&[0x48, 0xff, 0x03]); // inc qword [rbx]
    a.data(&[0x48, 0x3b, 0x03]); // cmp rax, [rbx]
    a.data(&[0x0f, 0x85]); // jne mismatch (rel32, patched below)
    let jne_mismatch = a.bytes.len();
    a.data(&[0; 4]);
    a.data(&[0xa9, 0xff, 0x0f, 0, 0]); // test eax, 0xfff
    a.data(&[0x75, 0]); // jnz skip (patched)
    let jnz_skip = a.bytes.len();
    a.data(&[0x48, 0x89, 0xc1]); // mov rcx, rax (out uses al)
    a.print(".");
    a.data(&[0x48, 0x89, 0xc8]); // mov rax, rcx
    let skip = a.bytes.len();
    a.bytes[jnz_skip - 1] = (skip - jnz_skip) as u8;
    a.data(&[0x48, 0x3b, 0x43, 0x08]); // cmp rax, [rbx + 8] (LIMIT)
    let rel = top as i64 - (a.here() as i64 + 6);
    a.data(&[0x0f, 0x85]).data(&(rel as i32).to_le_bytes()); // jne top
    a.data(&[0x48, 0x8b, 0x4b, 0x10]); // mov rcx, [rbx + 16] (INPUT)
    a.data(&[0x48, 0x89, 0x4b, 0x18]); // mov [rbx + 24], rcx (TARGET)
    a.data(&[0x48, 0x89, 0x43, 0x20]); // mov [rbx + 32], rax (RESULT)
    a.print("\ndone\n").power_off();
    let mismatch = a.bytes.len();
    let rel = (mismatch - (jne_mismatch + 4)) as i32;
    a.bytes[jne_mismatch..jne_mismatch + 4].copy_from_slice(&rel.to_le_bytes());
    a.print("MISMATCH\n").power_off();
    assert!(a.here() < DATA, "code runs into the data page");
    a.bytes
}

fn config() -> (VmConfig, SharedBuffer) {
    raw_config(counter_program(), CODE, CODE, CpuMode::Long)
}

fn read(vm_mem: &vm_memory::GuestMemoryMmap, addr: u64) -> u64 {
    vm_mem
        .read_obj(GuestAddress(addr))
        .expect("address in guest memory")
}

/// Boots the program with no limit, lets it count past `at_least`, and snapshots it.
/// Returns the count in the snapshot.
fn snapshot_running_counter(path: &Path, at_least: u64) -> u64 {
    require_kvm();
    let (config, console) = config();
    let builder = VmBuilder::new(config).expect("build VM");
    builder
        .memory()
        .write_obj(u64::MAX, GuestAddress(LIMIT))
        .unwrap();
    let vm = builder.start().expect("start VM");
    let deadline = Instant::now() + TIMEOUT;
    while read(vm.memory(), COUNTER) < at_least {
        assert!(
            Instant::now() < deadline,
            "the program did not count to {at_least} in {TIMEOUT:?}; console: {:?}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.snapshot(path).expect("snapshot");
    let count = read(vm.memory(), COUNTER);
    assert!(
        console.text().starts_with("start\n"),
        "{:?}",
        console.text()
    );
    assert!(!console.text().contains("MISMATCH"), "{:?}", console.text());
    count
}

/// Stops `vm` if it is still running after [`TIMEOUT`], so a broken restore cannot hang
/// the test. Dropping the returned sender disarms it.
fn watchdog(vm: &Vm) -> std::sync::mpsc::Sender<()> {
    let stop = vm.stop_handle().expect("stop handle");
    let (tx, rx) = channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(TIMEOUT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = stop.stop();
        }
    });
    tx
}

/// Restores the snapshot, gives the program its limit and input, and starts it.
fn restore(path: &Path, limit: u64, input: u64) -> (Vm, SharedBuffer) {
    let (config, console) = config();
    let builder = VmBuilder::restore(config, path).expect("restore");
    builder
        .memory()
        .write_obj(limit, GuestAddress(LIMIT))
        .unwrap();
    builder
        .memory()
        .write_obj(input, GuestAddress(INPUT))
        .unwrap();
    (builder.start().expect("start restored VM"), console)
}

fn run_to_power_off(vm: &mut Vm, console: &SharedBuffer) {
    let _armed = watchdog(vm);
    let outcome = vm
        .wait(RunOptions::default())
        .unwrap_or_else(|e| panic!("restored guest failed: {e}; console {:?}", console.text()));
    assert_eq!(
        outcome.exit,
        GuestExit::PowerOff,
        "console {:?}",
        console.text()
    );
}

#[test]
fn restored_program_continues_counting_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.snap");
    let at_snapshot = snapshot_running_counter(&path, 20_000);

    let (mut vm, console) = restore(&path, at_snapshot + MORE, 7);
    run_to_power_off(&mut vm, &console);
    let text = console.text();
    // Registers and memory both came back: the rax == [counter] check held, the count
    // went on from the snapshot, not from 0 (which would also have printed "start").
    assert!(
        !text.contains("MISMATCH") && !text.contains("start"),
        "{text:?}"
    );
    assert!(text.ends_with("\ndone\n"), "{text:?}");
    let dots = text.matches('.').count() as u64;
    let crossings = (at_snapshot + MORE) / 4096 - at_snapshot / 4096;
    assert_eq!(
        dots, crossings,
        "one dot per multiple of 4096 passed: {text:?}"
    );
    assert_eq!(read(vm.memory(), RESULT), at_snapshot + MORE);
    assert_eq!(read(vm.memory(), COUNTER), at_snapshot + MORE);
}

#[test]
fn two_vms_restored_from_one_snapshot_do_not_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.snap");
    let at_snapshot = snapshot_running_counter(&path, 5_000);

    // Both alive at once, each counting to its own limit and writing its own input to
    // the same guest address.
    let (mut a, console_a) = restore(&path, at_snapshot + MORE, 0xaaaa);
    let (mut b, console_b) = restore(&path, at_snapshot + 2 * MORE, 0xbbbb);
    run_to_power_off(&mut a, &console_a);
    run_to_power_off(&mut b, &console_b);
    assert_eq!(read(a.memory(), TARGET), 0xaaaa);
    assert_eq!(read(b.memory(), TARGET), 0xbbbb);
    assert_eq!(read(a.memory(), COUNTER), at_snapshot + MORE);
    assert_eq!(read(b.memory(), COUNTER), at_snapshot + 2 * MORE);

    // The file is untouched: a third restore sees the snapshot's values.
    let (config, _) = config();
    let c = VmBuilder::restore(config, &path).expect("restore");
    assert_eq!(read(c.memory(), TARGET), 0);
    assert_eq!(read(c.memory(), COUNTER), at_snapshot);
}

/// A change made to a good snapshot file.
type Patch = Box<dyn FnOnce(&mut Vec<u8>)>;

/// The error of restoring `path` into the counter program's configuration.
fn restore_error(path: &Path, config: VmConfig) -> SnapshotError {
    let result = VmBuilder::restore(config, path).and_then(VmBuilder::start);
    match result {
        Err(BuildError::Snapshot(e)) => e,
        Err(other) => panic!("expected a snapshot error, got: {other}"),
        Ok(_) => panic!("a bad snapshot was restored"),
    }
}

fn patched(
    src: &Path,
    dir: &Path,
    name: &str,
    patch: impl FnOnce(&mut Vec<u8>),
) -> std::path::PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    patch(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn corrupt_or_mismatched_snapshots_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.snap");
    snapshot_running_counter(&good, 1_000);
    let cases: Vec<(&str, Patch, &str)> = vec![
        ("magic", Box::new(|b| b[0] = b'X'), "not a husk snapshot"),
        (
            "version",
            Box::new(|b| b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes())),
            "format version",
        ),
        (
            "truncated-header",
            Box::new(|b| b.truncate(40)),
            "truncated in the header",
        ),
        (
            "truncated-memory",
            Box::new(|b| b.truncate(b.len() - 4096)),
            "truncated in guest memory",
        ),
        (
            "state",
            Box::new(|b| b[200] ^= 0x55),
            "does not match its checksum",
        ),
    ];
    for (name, patch, expected) in cases {
        let path = patched(&good, dir.path(), name, patch);
        let err = restore_error(&path, config().0);
        assert!(err.snapshot_unusable(), "{name}: {err}");
        let text = err.to_string();
        assert!(text.contains(expected), "{name}: {text}");
        assert!(
            text.contains("delete it"),
            "{name} must say the fix: {text}"
        );
    }

    // A different configuration: another program (same size and layout), then more vCPUs.
    let (mut other, _) = config();
    if let husk::vmm::BootSource::Raw { code, .. } = &mut other.boot {
        code.push(0x90);
    }
    let err = restore_error(&good, other);
    assert!(matches!(err, SnapshotError::Mismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("another VM configuration"),
        "{err}"
    );
    let (mut more_cpus, _) = config();
    more_cpus.vcpus = 2;
    let err = restore_error(&good, more_cpus);
    assert!(err.to_string().contains("vCPUs"), "{err}");
    assert!(err.snapshot_unusable());

    // A VM whose wait() returned has no vCPUs left to save.
    let mut stopped = VmBuilder::restore(config().0, &good)
        .and_then(VmBuilder::start)
        .expect("restore");
    let stop = stopped.stop_handle().unwrap();
    stop.stop().unwrap();
    assert_eq!(
        stopped.wait(RunOptions::default()).unwrap().exit,
        GuestExit::Stopped
    );
    let err = stopped.snapshot(&dir.path().join("late.snap")).unwrap_err();
    assert!(err.to_string().contains("wait_then_pause"), "{err}");

    // The untouched snapshot still restores.
    let (config, _) = config();
    VmBuilder::restore(config, &good)
        .and_then(VmBuilder::start)
        .expect("the good snapshot restores");
}
