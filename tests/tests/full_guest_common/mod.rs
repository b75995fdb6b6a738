//! Shared by the full-path guest tests (`full_agent_vm.rs`, `full_virtiofs.rs`): one
//! booted guest per test file, busybox rootfs in its share, and agent calls that cannot
//! hang (every stream has a read timeout).

#![allow(dead_code)] // each test file uses part of it

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk::artifacts::Artifact;
use husk::vmm::guest::{GuestVm, GuestVmConfig};
use husk::vmm::{ConsoleOutput, SharedBuffer};
use husk_protocol::client::{AgentClient, Spawned};
use husk_protocol::connector::Connector;
use husk_protocol::messages::{ProcessRef, StdioRequest};
use husk_protocol::ExitStatus;
use husk_tests::vmm::{guest_artifact, require_kvm, workspace_artifact_dir};
use oci_spec::runtime::{Process, ProcessBuilder, Spec};

/// Generous: a guest becomes ready in about 45 s here, but tests may share the two
/// cores with builds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(400);
/// One agent call or stream read; container creation costs tens of seconds of
/// emulated guest-kernel time here.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A booted guest, its directories and its console.
pub struct Guest {
    pub vm: GuestVm,
    pub console: SharedBuffer,
    pub dir: tempfile::TempDir,
}

/// Boots a guest with vsock and a share; panics with the console on failure.
pub fn boot() -> Guest {
    require_kvm();
    let dir = tempfile::tempdir().expect("temp dir");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let console = SharedBuffer::default();
    let mut config = GuestVmConfig::new(dir.path(), &share);
    config.kernel = Some(guest_artifact(Artifact::Kernel));
    config.initrd = Some(guest_artifact(Artifact::Initrd));
    let virtiofsd = workspace_artifact_dir().join("virtiofsd");
    assert!(
        virtiofsd.exists(),
        "{} is missing: run scripts/setup.sh",
        virtiofsd.display()
    );
    config.virtiofsd = Some(virtiofsd);
    config.console = ConsoleOutput::Buffer(console.clone());
    config.ready_timeout = READY_TIMEOUT;
    let vm = GuestVm::boot(config)
        .unwrap_or_else(|e| panic!("guest did not boot: {e}\nconsole:\n{}", console.text()));
    eprintln!(
        "figure: VMM start -> agent ready (share mounted): {} ms (ready signal {} ms)",
        vm.started_at().elapsed().as_millis(),
        vm.ready_after().as_millis()
    );
    Guest { vm, console, dir }
}

impl Guest {
    /// A control connection whose reads time out instead of hanging.
    pub fn client(&self) -> AgentClient {
        AgentClient::connect_with_read_timeout(self.vm.connector(), Some(CALL_TIMEOUT))
            .unwrap_or_else(|e| panic!("agent handshake: {e}\nconsole:\n{}", self.console.text()))
    }

    /// A stream to one of the agent's ports, with a read timeout.
    pub fn stream(&self, port: u32) -> UnixStream {
        let stream = self
            .vm
            .connector()
            .connect(port)
            .unwrap_or_else(|e| panic!("connect to port {port}: {e}\n{}", self.console.text()));
        stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        stream
    }

    /// Copies the busybox rootfs of `target/husk/bundle` to `<share>/<id>/rootfs`.
    pub fn add_rootfs(&self, id: &str) -> PathBuf {
        let src = workspace_artifact_dir().join("bundle/rootfs");
        assert!(
            src.is_dir(),
            "{} is missing: run scripts/setup.sh",
            src.display()
        );
        let dst = self.vm.host_rootfs(id);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cp -a {} {}",
            src.display(),
            dst.display()
        );
        dst
    }

    /// Creates and starts container `id` running `args` on its own copy of the rootfs.
    pub fn run(&self, id: &str, args: &[&str], stdin: bool, readonly: bool) -> Spawned {
        if !self.vm.host_rootfs(id).exists() {
            self.add_rootfs(id);
        }
        let mut client = self.client();
        let spawned = client
            .create_container(
                id,
                spec(args, readonly),
                self.vm.guest_rootfs(id),
                StdioRequest { stdin },
            )
            .unwrap_or_else(|e| panic!("create {id}: {e}\nconsole:\n{}", self.console.text()));
        client
            .start_container(id)
            .unwrap_or_else(|e| panic!("start {id}: {e}\nconsole:\n{}", self.console.text()));
        spawned
    }

    /// Runs `sh -c script` to the end; returns its stdout, stderr and exit status.
    pub fn sh(&self, id: &str, script: &str, readonly: bool) -> (String, String, ExitStatus) {
        self.sh_with_timeout(id, script, readonly, CALL_TIMEOUT)
    }

    /// [`Self::sh`] where the script may be silent for up to `quiet` between outputs.
    pub fn sh_with_timeout(
        &self,
        id: &str,
        script: &str,
        readonly: bool,
        quiet: Duration,
    ) -> (String, String, ExitStatus) {
        let spawned = self.run(id, &["sh", "-c", script], false, readonly);
        let stream = |port: Option<u32>| {
            let s = self.stream(port.expect("stdio port"));
            s.set_read_timeout(Some(quiet)).unwrap();
            s
        };
        let out = read_all(stream(spawned.stdio.stdout));
        let err = read_all(stream(spawned.stdio.stderr));
        let status = self.wait_and_delete(id);
        (out, err, status)
    }

    pub fn wait_and_delete(&self, id: &str) -> ExitStatus {
        let mut client = self.client();
        let status = client
            .wait_process(init(id))
            .unwrap_or_else(|e| panic!("wait {id}: {e}\nconsole:\n{}", self.console.text()));
        client.delete_container(id, true).expect("delete");
        status
    }
}

pub fn init(id: &str) -> ProcessRef {
    ProcessRef {
        container_id: id.to_owned(),
        exec_id: None,
    }
}

/// Reads a stream to its end; a read that times out fails with what came so far.
pub fn read_all(mut stream: UnixStream) -> String {
    let mut out = Vec::new();
    if let Err(e) = stream.read_to_end(&mut out) {
        panic!(
            "reading a stdio stream failed ({e}; a timeout?) after:\n{}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn process(args: &[&str]) -> Process {
    ProcessBuilder::default()
        .args(args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin:/sbin:/usr/bin".to_string()])
        .cwd("/")
        .terminal(false)
        .build()
        .unwrap()
}

/// oci-spec's default spec (namespaces, masked paths, default mounts) running `args`.
pub fn spec(args: &[&str], readonly: bool) -> Spec {
    let mut spec = Spec::default();
    spec.set_process(Some(process(args)));
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(readonly));
    }
    spec
}

/// sha256 of a host file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}
