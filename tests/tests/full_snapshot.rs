//! Full path: the real guest kernel and agent boot to "agent ready", the VM is
//! snapshotted, and a new VM restored from the snapshot really runs the guest. Minutes
//! here (shared/substrate.md); run with `flock /tmp/husk-vm.lock`.
//!
//! What proves the restored guest runs: the agent answers `Ping` over the restored VM's
//! vsock device, which needs the virtio queues restored and the transport reset the VMM
//! sends after a restore; and bytes fed to the restored VM's serial port come
//! back on its console. That is the guest kernel's tty layer echoing its console input
//! (the agent, PID 1, holds /dev/console open with the default termios), so it needs the
//! restored IOAPIC and LAPIC to deliver COM1's interrupt, the restored vCPU to run the
//! guest's interrupt handler, its scheduler to run the kworker that feeds the line
//! discipline, and the UART state to transmit. A guest that failed to resume, or resumed
//! with broken state, prints nothing (or a crash, which the test shows).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk::artifacts::Artifact;
use husk::host::HostMode;
use husk::vmm::config::{FsBackend, FsShareConfig};
use husk::vmm::config::{VirtioDevicesConfig, VsockDeviceConfig};
use husk::vmm::devices::serial::SerialDevice;
use husk::vmm::guest::{GUEST_SHARE_DIR, SHARE_TAG, VIRTIOFSD_SOCKET, VSOCK_SOCKET};
use husk::vmm::{
    BootSource, ConsoleOutput, GuestExit, RunOptions, SharedBuffer, Vm, VmBuilder, VmConfig,
    VmStopHandle,
};
use husk_protocol::client::AgentClient;
use husk_protocol::connector::{Connector, HybridVsockConnector};
use husk_protocol::messages::StdioRequest;
use husk_protocol::ExitStatus;
use husk_tests::vmm::workspace_artifact_dir;
use std::os::unix::net::UnixStream;

mod full_guest_common;
use full_guest_common::{init, read_all, spec};
use husk_tests::vmm::{guest_artifact, require_kvm};

const READY_TIMEOUT: Duration = Duration::from_secs(400);
/// The echo needs a few hundred emulated guest-kernel instructions per byte plus a
/// kworker wake-up; generous for a loaded machine.
const ECHO_TIMEOUT: Duration = Duration::from_secs(120);
/// One agent call (connect, handshake, ping) through the emulated guest kernel.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

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
            initrd: copy(Artifact::Initrd, "guest-image"),
        }
    }
}

fn config(guest: &Guest, console: &SharedBuffer, vsock: &Path) -> VmConfig {
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
        devices: VirtioDevicesConfig {
            vsock: Some(VsockDeviceConfig {
                uds_path: vsock.to_owned(),
                guest_cid: 3,
            }),
            shares: Vec::new(),
            net: None,
        },
    }
}

fn boot_to_ready_and_snapshot(guest: &Guest, path: &Path) {
    let console = SharedBuffer::default();
    let vsock = path.with_extension("vsock");
    let mut vm = VmBuilder::new(config(guest, &console, &vsock))
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
fn echoed(serial: &Arc<Mutex<SerialDevice>>, console: &SharedBuffer, text: &str) -> Duration {
    let t0 = Instant::now();
    let mut fed = 0;
    while t0.elapsed() < ECHO_TIMEOUT {
        if fed < text.len() {
            // The UART FIFO takes what fits; the rest goes in as the guest drains it.
            fed += serial
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

/// A restored VM whose event loop runs on its own thread (vsock needs it).
struct Running {
    serial: Arc<Mutex<SerialDevice>>,
    stop: VmStopHandle,
    uds: PathBuf,
    thread: std::thread::JoinHandle<Result<GuestExit, String>>,
}

impl Running {
    fn restore(
        guest: &Guest,
        console: &SharedBuffer,
        snap: &Path,
        uds: PathBuf,
    ) -> (Self, Duration) {
        Self::restore_config(config(guest, console, &uds), snap, uds)
    }

    fn restore_config(config: VmConfig, snap: &Path, uds: PathBuf) -> (Self, Duration) {
        let t0 = Instant::now();
        let mut vm: Vm = VmBuilder::restore(config, snap)
            .and_then(VmBuilder::start)
            .expect("restore");
        let took = t0.elapsed();
        assert!(
            vm.ready_after().is_some(),
            "a VM restored from a ready snapshot counts as ready"
        );
        let serial = vm.serial();
        let stop = vm.stop_handle().unwrap();
        let thread = std::thread::spawn(move || {
            vm.wait(RunOptions::default())
                .map(|o| o.exit)
                .map_err(|e| e.to_string())
        });
        (
            Self {
                serial,
                stop,
                uds,
                thread,
            },
            took,
        )
    }

    /// A stream to the agent's `port`, with a read timeout.
    fn stream(&self, port: u32, console: &SharedBuffer) -> UnixStream {
        let stream = HybridVsockConnector::new(&self.uds)
            .with_reply_timeout(CALL_TIMEOUT)
            .connect(port)
            .unwrap_or_else(|e| panic!("vsock connect: {e}\nconsole:\n{}", console.text()));
        stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        stream
    }

    fn agent(&self, console: &SharedBuffer) -> AgentClient<UnixStream> {
        let connector = HybridVsockConnector::new(&self.uds).with_reply_timeout(CALL_TIMEOUT);
        AgentClient::connect_with_read_timeout(&connector, Some(CALL_TIMEOUT))
            .unwrap_or_else(|e| panic!("agent handshake: {e}\nconsole:\n{}", console.text()))
    }

    /// Pings the agent over vsock; returns how long it took.
    fn ping(&self, console: &SharedBuffer) -> Duration {
        let t0 = Instant::now();
        self.agent(console)
            .ping()
            .unwrap_or_else(|e| panic!("agent ping: {e}\nconsole:\n{}", console.text()));
        t0.elapsed()
    }

    fn stop(self) {
        self.stop.stop().unwrap();
        let exit = self.thread.join().expect("VM thread");
        assert_eq!(exit, Ok(GuestExit::Stopped));
    }
}

#[test]
fn guest_restored_at_agent_ready_answers_the_agent_and_two_restores_are_independent() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ready.snap");
    let guest = Guest::copy_to(dir.path());
    boot_to_ready_and_snapshot(&guest, &path);

    let console_a = SharedBuffer::default();
    let (a, restored) = Running::restore(&guest, &console_a, &path, dir.path().join("a.vsock"));
    let ping_a = a.ping(&console_a);
    eprintln!(
        "figure: restore (map + state + vCPUs) {} ms; agent Ping answered {} ms later",
        restored.as_millis(),
        ping_a.as_millis()
    );
    let echo_a = echoed(&a.serial, &console_a, "restored-a\n");
    eprintln!(
        "figure: console echo from the restored guest after {} ms",
        echo_a.as_millis()
    );
    assert!(
        !console_a.text().contains("Run /init"),
        "the restored guest must not have booted again:\n{}",
        console_a.text()
    );

    // A second VM from the same file, alive together with the first: each answers on its
    // own socket and echoes only what it was given.
    let console_b = SharedBuffer::default();
    let (b, _) = Running::restore(&guest, &console_b, &path, dir.path().join("b.vsock"));
    b.ping(&console_b);
    echoed(&b.serial, &console_b, "restored-b\n");
    a.ping(&console_a);
    echoed(&a.serial, &console_a, "again-a\n");
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
    a.stop();
    b.stop();
}

/// A VM with the vsock device and a virtio-fs share of `share` (served by a virtiofsd the
/// VMM starts), its sockets in `run`: the shape of a sandbox.
fn sandbox_config(guest: &Guest, console: &SharedBuffer, run: &Path, share: &Path) -> VmConfig {
    let mut config = config(guest, console, &run.join(VSOCK_SOCKET));
    let virtiofsd = workspace_artifact_dir().join("virtiofsd");
    assert!(
        virtiofsd.exists(),
        "{} is missing: run scripts/setup.sh",
        virtiofsd.display()
    );
    config.devices.shares.push(FsShareConfig {
        tag: SHARE_TAG.into(),
        dir: share.to_owned(),
        backend: FsBackend::Spawn { virtiofsd },
        socket_path: run.join(VIRTIOFSD_SOCKET),
    });
    config
}

/// The template is taken at agent ready with the share device present but not mounted;
/// a sandbox restored from it gets its own share directory and a fresh virtiofsd, mounts
/// it, and runs a container from it.
#[test]
fn sandbox_restored_from_a_template_runs_a_container_on_its_own_share() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let guest = Guest::copy_to(dir.path());
    let path = dir.path().join("template.snap");
    let (run_t, share_t) = (dir.path().join("run-t"), dir.path().join("share-t"));
    for d in [&run_t, &share_t] {
        std::fs::create_dir(d).unwrap();
    }
    let console_t = SharedBuffer::default();
    let mut vm = VmBuilder::new(sandbox_config(&guest, &console_t, &run_t, &share_t))
        .and_then(VmBuilder::start)
        .expect("template VM");
    let outcome = vm
        .wait_then_pause(RunOptions {
            until_ready: true,
            ready_timeout: Some(READY_TIMEOUT),
        })
        .unwrap_or_else(|e| panic!("template not ready: {e}\nconsole:\n{}", console_t.text()));
    let cold_ready = outcome.ready_after.expect("ready time");
    vm.snapshot(&path).expect("snapshot the template");
    drop(vm);

    let (run, share) = (dir.path().join("run"), dir.path().join("share"));
    for d in [&run, &share] {
        std::fs::create_dir(d).unwrap();
    }
    let rootfs = share.join("c1/rootfs");
    std::fs::create_dir_all(rootfs.parent().unwrap()).unwrap();
    let src = workspace_artifact_dir().join("bundle/rootfs");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        rootfs.display()
    );

    let console = SharedBuffer::default();
    let t0 = Instant::now();
    let (vm, restored) = Running::restore_config(
        sandbox_config(&guest, &console, &run, &share),
        &path,
        run.join(VSOCK_SOCKET),
    );
    let mut agent = vm.agent(&console);
    agent
        .mount_share(SHARE_TAG, GUEST_SHARE_DIR, false)
        .unwrap_or_else(|e| panic!("mount the share: {e}\nconsole:\n{}", console.text()));
    let guest_rootfs = Path::new(GUEST_SHARE_DIR).join("c1/rootfs");
    let spawned = agent
        .create_container(
            "c1",
            spec(&["echo", "hello from a restored sandbox"], false),
            guest_rootfs,
            StdioRequest { stdin: false },
        )
        .unwrap_or_else(|e| panic!("create: {e}\nconsole:\n{}", console.text()));
    agent.start_container("c1").expect("start");
    let out = read_all(vm.stream(spawned.stdio.stdout.expect("stdout port"), &console));
    let first_output = t0.elapsed();
    assert_eq!(
        out,
        "hello from a restored sandbox\n",
        "console:\n{}",
        console.text()
    );
    assert_eq!(
        agent.wait_process(init("c1")).expect("wait"),
        ExitStatus::Exited(0)
    );
    eprintln!(
        "figure: template cold boot to agent ready {} ms; restored sandbox: restore {} ms, \
         restore -> mount share -> first container output {} ms",
        cold_ready.as_millis(),
        restored.as_millis(),
        first_output.as_millis()
    );
    drop(agent);
    vm.stop();
}
