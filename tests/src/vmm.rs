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
