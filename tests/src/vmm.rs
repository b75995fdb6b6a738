//! Running guests through the real VMM and /dev/kvm, for the tier-2 and tier-3 tests.

use std::time::Duration;

use husk::host::HostMode;
use husk::vmm::{
    BootSource, ConsoleOutput, CpuMode, RunError, RunOptions, SharedBuffer, Vm, VmBuilder,
    VmConfig, VmOutcome,
};
use vm_memory::{Bytes, GuestAddress};

/// Fails the test with a clear message when this host has no usable KVM. VM tests must
/// fail, not skip, so a CI machine without KVM cannot pass them silently.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs a usable /dev/kvm (open failed: {e}); run it on a KVM host");
    }
}

/// A guest that ran: how it ended, what it printed, and the (stopped) VM to inspect.
pub struct GuestRun {
    pub outcome: Result<VmOutcome, RunError>,
    pub console: SharedBuffer,
    pub vm: Vm,
}

impl GuestRun {
    pub fn console_text(&self) -> String {
        self.console.text()
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.vm
            .memory()
            .read_obj(GuestAddress(addr))
            .expect("address in guest memory")
    }
}

/// A raw-program VM config with its console captured.
pub fn raw_config(
    code: Vec<u8>,
    load_addr: u64,
    entry: u64,
    mode: CpuMode,
) -> (VmConfig, SharedBuffer) {
    let console = SharedBuffer::default();
    let config = VmConfig {
        vcpus: 1,
        cpu_template: Default::default(),
        mem_mib: 32,
        boot: BootSource::Raw {
            code,
            load_addr,
            entry,
            mode,
        },
        console: ConsoleOutput::Buffer(console.clone()),
        console_input: false,
        host_mode: HostMode::detect(),
        devices: Default::default(),
    };
    (config, console)
}

/// Starts a VM and returns it running (for tests that pause/resume it).
pub fn start(config: VmConfig) -> Vm {
    require_kvm();
    VmBuilder::new(config)
        .expect("build VM")
        .start()
        .expect("start VM")
}

/// Runs a raw program until it powers off, fails, or `timeout` passes without ready.
pub fn run_raw(code: Vec<u8>, load_addr: u64, mode: CpuMode, opts: RunOptions) -> GuestRun {
    let (config, console) = raw_config(code, load_addr, load_addr, mode);
    let mut vm = start(config);
    let outcome = vm.wait(opts);
    GuestRun {
        outcome,
        console,
        vm,
    }
}

/// Options for programs that power off by themselves (a generous ready deadline,
/// since CPL0 code is emulated instruction by instruction on PVM hosts).
pub fn until_power_off() -> RunOptions {
    RunOptions {
        until_ready: false,
        ready_timeout: Some(Duration::from_secs(30)),
    }
}

/// The workspace's build output directory for guest artifacts (`scripts/setup.sh`).
pub fn workspace_artifact_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/husk")
}

/// The guest kernel or guest image for full-path tests: `HUSK_KERNEL` / `HUSK_INITRD`,
/// else `target/husk/` (the root disk image before the initramfs, as `husk` picks).
/// Fails (never skips) with the way to get it when it is missing.
pub fn guest_artifact(artifact: husk::artifacts::Artifact) -> std::path::PathBuf {
    use husk::artifacts::{locate, Artifact, ROOT_DISK_FILE};
    let (names, var): (&[&str], _) = match artifact {
        Artifact::Kernel => (&["vmlinux"], "HUSK_KERNEL"),
        Artifact::Initrd => (&[ROOT_DISK_FILE, INITRAMFS_FILE], "HUSK_INITRD"),
        other => panic!("{other:?} is not a guest artifact"),
    };
    let in_target = names
        .iter()
        .map(|name| workspace_artifact_dir().join(name))
        .find(|path| path.exists());
    let use_target = in_target.filter(|_| std::env::var_os(var).is_none());
    locate(artifact, use_target.as_deref())
        .unwrap_or_else(|e| panic!("full-path VM tests need the guest artifacts: {e}"))
}

/// The initramfs `scripts/setup.sh` builds next to the root disk.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

/// The initramfs form of the guest image (`target/husk/initramfs.cpio`), for the tests
/// that boot it rather than the root disk.
pub fn guest_initramfs() -> std::path::PathBuf {
    let path = workspace_artifact_dir().join(INITRAMFS_FILE);
    assert!(
        path.exists(),
        "{} is missing; run scripts/setup.sh",
        path.display()
    );
    path
}

/// The `husk` binary of this workspace (built by `cargo build -p husk`).
pub fn husk_binary() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/husk");
    assert!(
        bin.exists(),
        "{} is missing; run `cargo build -p husk` first",
        bin.display()
    );
    bin
}
