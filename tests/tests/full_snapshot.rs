//! Full path: the real guest kernel and agent boot to "agent ready", the VM is
//! snapshotted, and a new VM restored from the snapshot really runs the guest. Minutes
//! here (shared/substrate.md); run with `flock /tmp/husk-vm.lock`.
//!
//! What proves the restored guest runs: bytes fed to the restored VM's serial port come
//! back on its console. That is the guest kernel's tty layer echoing its console input
//! (the agent, PID 1, holds /dev/console open with the default termios), so it needs the
//! restored IOAPIC and LAPIC to deliver COM1's interrupt, the restored vCPU to run the
//! guest's interrupt handler, its scheduler to run the kworker that feeds the line
//! discipline, and the UART state to transmit. A guest that failed to resume, or resumed
//! with broken state, prints nothing (or a crash, which the test shows).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk::artifacts::Artifact;
use husk::host::HostMode;
use husk::vmm::{
    BootSource, ConsoleOutput, GuestExit, RunOptions, SharedBuffer, Vm, VmBuilder, VmConfig,
};
use husk_tests::vmm::{guest_artifact, require_kvm};

const READY_TIMEOUT: Duration = Duration::from_secs(400);
/// The echo needs a few hundred emulated guest-kernel instructions per byte plus a
/// kworker wake-up; generous for a loaded machine.
const ECHO_TIMEOUT: Duration = Duration::from_secs(120);

/// Private copies of the guest kernel and initramfs: the snapshot is tied to the files
/// it booted from (their fingerprint), and other work in this checkout may rebuild the
/// initramfs while the test runs.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Guest {
    fn copy_to(dir: &Path) -> Self {
        let copy = |artifact, name| {
            let to = dir.join(name);
            std::fs::copy(guest_artifact(artifact), &to).expect("copy a guest artifact");
            to
        };
        Self {
            kernel: copy(Artifact::Kernel, "vmlinux"),
            initrd: copy(Artifact::Initrd, "initramfs.cpio"),
        }
    }
}

fn config(guest: &Guest, console: &SharedBuffer) -> VmConfig {
    VmConfig {
        vcpus: 1,
        cpu_template: Default::default(),
        mem_mib: 128,
        boot: BootSource::Linux {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline_extra: String::new(),
        },
        console: ConsoleOutput::Buffer(console.clone()),
        console_input: false,
        host_mode: HostMode::detect(),
        devices: Default::default(),
    }
}

fn boot_to_ready_and_snapshot(guest: &Guest, path: &Path) {
    let console = SharedBuffer::default();
    let mut vm = VmBuilder::new(config(guest, &console))
        .expect("build VM")
        .start()
        .expect("start VM");
    let outcome = vm
        .wait_then_pause(RunOptions {
            until_ready: true,
            ready_timeout: Some(READY_TIMEOUT),
        })
        .unwrap_or_else(|e| panic!("guest not ready: {e}\nconsole:\n{}", console.text()));
    assert_eq!(outcome.exit, GuestExit::Ready);
    let ready = outcome.ready_after.expect("ready time");
    let t0 = Instant::now();
    vm.snapshot(path).expect("snapshot");
    let taken = t0.elapsed();
    let meta = std::fs::metadata(path).unwrap();
    use std::os::unix::fs::MetadataExt;
    eprintln!(
        "figure: cold boot to agent ready {} ms; snapshot written in {} ms, {} MiB file, {} MiB allocated",
        ready.as_millis(),
        taken.as_millis(),
        meta.len() >> 20,
        (meta.blocks() * 512) >> 20
    );
}

/// Feeds `text` to the guest's console and waits until the guest echoes it.
fn echoed(vm: &Vm, console: &SharedBuffer, text: &str) -> Duration {
    let t0 = Instant::now();
    let mut fed = 0;
    while t0.elapsed() < ECHO_TIMEOUT {
        if fed < text.len() {
            // The UART FIFO takes what fits; the rest goes in as the guest drains it.
            fed += vm
                .serial()
                .lock()
                .expect("serial lock")
                .enqueue_input(&text.as_bytes()[fed..]);
        }
        // The tty's output processing turns "\n" into "\r\n".
        if console.text().replace('\r', "").contains(text) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the restored guest did not echo {text:?} within {ECHO_TIMEOUT:?}; its console:\n{}",
        console.text()
    );
}

#[test]
fn guest_restored_at_agent_ready_runs_and_two_restores_are_independent() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ready.snap");
    let guest = Guest::copy_to(dir.path());
    boot_to_ready_and_snapshot(&guest, &path);

    let console_a = SharedBuffer::default();
    let t0 = Instant::now();
    let vm_a = VmBuilder::restore(config(&guest, &console_a), &path)
        .and_then(VmBuilder::start)
        .expect("restore");
    let restored = t0.elapsed();
    assert!(
        vm_a.ready_after().is_some(),
        "a VM restored from a ready snapshot counts as ready"
    );
    let echo_a = echoed(&vm_a, &console_a, "restored-a\n");
    eprintln!(
        "figure: restore (map + state + vCPUs) {} ms; first echo from the restored guest after {} ms",
        restored.as_millis(),
        echo_a.as_millis()
    );
    assert!(
        !console_a.text().contains("Run /init"),
        "the restored guest must not have booted again:\n{}",
        console_a.text()
    );

    // A second VM from the same file, alive together with the first: each echoes only
    // what it was given.
    let console_b = SharedBuffer::default();
    let vm_b = VmBuilder::restore(config(&guest, &console_b), &path)
        .and_then(VmBuilder::start)
        .expect("second restore");
    echoed(&vm_b, &console_b, "restored-b\n");
    echoed(&vm_a, &console_a, "again-a\n");
    assert!(
        !console_b.text().contains("restored-a"),
        "{}",
        console_b.text()
    );
    assert!(
        !console_a.text().contains("restored-b"),
        "{}",
        console_a.text()
    );
}
