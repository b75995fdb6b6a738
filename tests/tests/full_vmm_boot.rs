//! Full path: the project's guest kernel and initramfs (agent as /init) boot in the VMM
//! until the agent signals ready. Minutes each on PVM hosts (shared/substrate.md), so few.
//! They fail, not skip, when /dev/kvm, the kernel or the initramfs is missing.

use std::process::Command;
use std::time::Duration;

use husk::artifacts::Artifact;
use husk::host::HostMode;
use husk::vmm::{
    BootSource, ConsoleOutput, GuestExit, RunOptions, SharedBuffer, VmBuilder, VmConfig,
};
use husk_tests::vmm::{guest_artifact, guest_initramfs, husk_binary, require_kvm};

/// Generous: the target is ready within 90 s of VMM start, but tests may share the two
/// cores with builds and with each other.
const READY_TIMEOUT: Duration = Duration::from_secs(400);

/// Boots `image` (the root disk or the initramfs) until the agent is ready; the console.
fn boot_until_ready(vcpus: u8, mem_mib: u64, image: std::path::PathBuf) -> String {
    require_kvm();
    let console = SharedBuffer::default();
    let config = VmConfig {
        vcpus,
        cpu_template: Default::default(),
        mem_mib,
        boot: BootSource::Linux {
            kernel: guest_artifact(Artifact::Kernel),
            initrd: Some(image),
            cmdline_extra: String::new(),
        },
        console: ConsoleOutput::Buffer(console.clone()),
        console_input: false,
        host_mode: HostMode::detect(),
        devices: Default::default(),
    };
    let mut vm = VmBuilder::new(config)
        .expect("build VM")
        .start()
        .expect("start VM");
    let opts = RunOptions {
        until_ready: true,
        ready_timeout: Some(READY_TIMEOUT),
    };
    let outcome = vm.wait(opts).unwrap_or_else(|e| {
        panic!(
            "guest did not become ready: {e}\nconsole:\n{}",
            console.text()
        )
    });
    let text = console.text();
    assert_eq!(outcome.exit, GuestExit::Ready, "console:\n{text}");
    let ready = outcome.ready_after.expect("ready time");
    eprintln!(
        "{vcpus} vCPU / {mem_mib} MiB: ready after {} ms",
        ready.as_millis()
    );
    assert!(text.contains("Run /init"), "console:\n{text}");
    let text = console_with(&console, "vector state:");
    assert_vector_state(&text);
    text
}

/// The console once it holds `needle` (the agent's lines may trail its ready signal
/// through the UART), or as it is after 60 s.
fn console_with(console: &SharedBuffer, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = console.text();
        if text.contains(needle) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On PVM hosts the guest kernel saves only x87/SSE state, yet user space sees AVX enabled:
/// the kernel must hand the agent `GLIBC_TUNABLES` turning glibc's AVX code off
/// (cmdline.pvm, guest-agent/src/vector_state.rs), and the agent reports it.
fn assert_vector_state(console: &str) {
    let line = console
        .lines()
        .find(|l| l.contains("husk-agent: vector state:"))
        .unwrap_or_else(|| panic!("the agent reports its vector state:\n{console}"));
    eprintln!("{line}");
    if HostMode::detect() == HostMode::Pvm {
        assert!(
            line.contains("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,"),
            "the agent must run with glibc's AVX code off on PVM: {line}"
        );
    }
}

#[test]
fn linux_guest_with_one_vcpu_boots_its_root_disk_until_the_agent_is_ready() {
    let image = guest_artifact(Artifact::Initrd);
    let console = boot_until_ready(1, 128, image);
    assert!(console.contains("Processors: 1"), "console:\n{console}");
    // The VMM's seed (setup_data) readies the kernel's generator before the first
    // initcall; without it the guest reached ready with it still unseeded.
    let seeded = console.find("random: crng init done");
    let first_initcall = console.find("Calibrating delay loop");
    assert!(
        matches!((seeded, first_initcall), (Some(s), Some(c)) if s < c),
        "the RNG was not seeded at boot:\n{console}"
    );
    // The root disk: served by virtio-blk, mounted read-only, no initramfs to unpack.
    for line in [
        "virtio_blk virtio0: [vda]",
        "VFS: Mounted root (ext4 filesystem) readonly",
    ] {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    assert!(
        !console.contains("Unpacking initramfs"),
        "console:\n{console}"
    );
    assert_husk_platform(&console);
}

/// The guest kernel read husk's platform leaves (vmm/boot/platform.rs, patches 0021 and
/// 0024): no legacy PIC, so no ISA interrupts preallocated; on PVM hosts the hidden
/// features came from the leaves, and `clearcpuid=` is not on its command line; with an
/// invariant host TSC the TSC, not kvm-clock, is its clock; init's environment came in
/// husk's setup_data entry.
fn assert_husk_platform(console: &str) {
    assert!(
        console.contains("preallocated irqs: 0"),
        "the guest set up a legacy PIC:\n{console}"
    );
    let pvm = HostMode::detect() == HostMode::Pvm;
    // KVM shows the vCPUs an invariant TSC when the host's is (`nonstop_tsc`).
    let tsc_clock = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|flag| flag == "nonstop_tsc"));
    // No legacy PIC, features listed (PVM), TSC clock, RAM zeroed (patch 0026).
    let flags = 0x1 | if pvm { 0x2 } else { 0 } | if tsc_clock { 0x4 } else { 0 } | 0x8;
    // The 19 `clearcpuid=` names and XSAVE (`noxsave`).
    let cleared = if pvm { 20 } else { 0 };
    let platform = format!("husk platform: flags {flags:#x}, {cleared} CPU features cleared");
    assert!(
        console.contains(&platform),
        "{platform:?} missing:\n{console}"
    );
    if tsc_clock {
        assert!(
            console.contains("clocksource: Switched to clocksource tsc")
                && !console.contains("kvm-clock: using sched offset"),
            "the TSC is not the guest's clock:\n{console}"
        );
    }
    let cmdline = console
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("no command line in:\n{console}"));
    assert!(!cmdline.contains("clearcpuid"), "{cmdline}");
    if pvm {
        // GLIBC_TUNABLES reached the agent (assert_vector_state) through husk's
        // setup_data entry (patch 0025), not the command line; XSAVE is off through
        // the leaves, not `noxsave`.
        assert!(
            !cmdline.contains("noxsave") && !cmdline.contains("GLIBC_TUNABLES"),
            "{cmdline}"
        );
        assert!(
            console.contains("x86/fpu: x87 FPU will use FXSAVE"),
            "the guest kernel must not use XSAVE on PVM:\n{console}"
        );
    }
}

#[test]
fn linux_guest_with_two_vcpus_brings_up_both_cpus_and_becomes_ready() {
    // The initramfs form of the guest image: the other way to boot, kept working.
    let console = boot_until_ready(2, 256, guest_initramfs());
    assert!(
        console.contains("Unpacking initramfs"),
        "console:\n{console}"
    );
    assert!(
        console.contains("Processors: 2"),
        "MP table must list 2 CPUs:\n{console}"
    );
    assert!(
        console.contains("Brought up 1 node, 2 CPUs"),
        "second CPU must start:\n{console}"
    );
    // CPUID topology: both vCPUs are cores of one package (not one package each).
    assert_husk_platform(&console);
    assert!(
        console.contains("Max logical packages: 1"),
        "one package:\n{console}"
    );
}

/// `husk vmm boot` without --until-ready: the agent powers off right after ready (through
/// the i8042 reset), the command exits 0 and its last line is the boot time.
#[test]
fn husk_vmm_boot_ends_when_the_guest_powers_off() {
    require_kvm();
    let out = Command::new(husk_binary())
        .args([
            "vmm",
            "boot",
            "--timeout",
            &READY_TIMEOUT.as_secs().to_string(),
        ])
        .arg("--kernel")
        .arg(guest_artifact(Artifact::Kernel))
        .arg("--initrd")
        .arg(guest_artifact(Artifact::Initrd))
        .output()
        .expect("run husk vmm boot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {}\nstderr: {stderr}\nstdout:\n{stdout}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("boot: ready after ") && last.ends_with(" ms"),
        "last line {last:?}"
    );
    assert!(stdout.contains("husk-agent: ready"), "stdout:\n{stdout}");
}

#[test]
fn husk_vmm_boot_rejects_a_kernel_that_is_not_elf() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bzImage");
    std::fs::write(&bogus, b"MZ not an ELF").unwrap();
    let out = Command::new(husk_binary())
        .args(["vmm", "boot", "--until-ready", "--kernel"])
        .arg(&bogus)
        .arg("--initrd")
        .arg(&bogus)
        .output()
        .expect("run husk vmm boot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("not a loadable ELF vmlinux"),
        "stderr: {stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some("boot: no ready signal")
    );
}
