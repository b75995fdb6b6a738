//! `--isolation vm`: one microVM per container, run by a `husk vmm daemon` process
//! (see [`crate::daemon`] for the process model and the files under the entry).
//!
//! The pid of a VM container is the daemon's: it exits with the container's exit code.
//! `create` starts the daemon and returns once the container waits at the exec barrier
//! in the guest; `state`, `start`, `kill`, `pause`, `resume`, `delete` go through the
//! daemon's control socket; `exec` starts a helper process per exec that talks to the
//! agent directly; a dead daemon means the container is `stopped`.
//!
//! The guest is a microVM, except in tier-2 tests where `HUSK_TEST_GUEST=host-agent`
//! runs the agent on the host ([`crate::daemon::config::TEST_GUEST_ENV`]; test-only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxResources, Process, UserBuilder};

use super::{CreateOptions, ExecOptions, GuestArtifacts, Sandbox, SandboxError};
use crate::artifacts::{locate, Artifact};
use crate::daemon::config::TEST_GUEST_ENV;
use crate::daemon::control::{self, ControlRequest, ControlResponse};
use crate::daemon::liveness::ProcessId;
use crate::daemon::{exec, ready, share, DaemonConfig, GuestKind, Layout};
use crate::oci::{Bundle, Entry, Status};

/// Boot (~45 s on PVM hosts) plus container creation, with room for a loaded machine.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest gets 30 s to power off after the agent's Shutdown (GuestVm), then is stopped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// The VM backend. Stateless: everything lives in the store entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmSandbox;

pub(super) fn backend_err(id: &str, op: &'static str, message: impl ToString) -> SandboxError {
    SandboxError::Backend {
        id: id.to_string(),
        op,
        message: message.to_string(),
    }
}

fn hint(op: &'static str) -> &'static str {
    match op {
        "delete" => " (stop it first, or use --force)",
        "start" => " (only a created container can be started)",
        "exec" | "kill" | "pause" => " (it must be running)",
        "resume" => " (it is not paused)",
        _ => "",
    }
}

pub(super) fn wrong_status(entry: &Entry, status: Status, op: &'static str) -> SandboxError {
    SandboxError::WrongStatus {
        id: entry.id().to_string(),
        status,
        op,
        hint: hint(op),
    }
}

/// The husk binary, for the daemon and exec helpers (not the running program when that
/// is the shim: see [`super::husk_binary`]).
fn husk_binary(id: &str, op: &'static str) -> Result<PathBuf, SandboxError> {
    super::husk_binary::find().map_err(|e| backend_err(id, op, e))
}

/// The directory under `--root` where guest templates are cached: not a valid container
/// id, so it can never collide with one, and `list` passes over it.
pub const TEMPLATES_DIR: &str = "@templates";

/// What the daemon boots, or the test-only host agent.
fn guest_kind(
    id: &str,
    artifacts: &GuestArtifacts,
    template_dir: Option<PathBuf>,
) -> Result<GuestKind, SandboxError> {
    if std::env::var(TEST_GUEST_ENV).as_deref() == Ok("host-agent") {
        let exe = husk_binary(id, "create")?;
        let agent = std::env::var_os("HUSK_AGENT")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe.with_file_name("husk-agent"));
        return Ok(GuestKind::HostAgent { agent });
    }
    let locate = |a, explicit: &Option<PathBuf>| {
        locate(a, explicit.as_deref()).map_err(|e| backend_err(id, "create", e))
    };
    Ok(GuestKind::Vm {
        kernel: locate(Artifact::Kernel, &artifacts.kernel)?,
        initrd: locate(Artifact::Initrd, &artifacts.initrd)?,
        vcpus: 1,
        mem_mib: crate::vmm::config::DEFAULT_MEM_MIB,
        template_dir,
    })
}

/// The config the daemon of the sandbox in `dir` was started with (None: create failed
/// before writing it).
pub(super) fn daemon_config(dir: &Path, id: &str) -> Result<Option<DaemonConfig>, SandboxError> {
    let path = Layout::new(dir, id, false).config();
    if !path.exists() {
        return Ok(None);
    }
    DaemonConfig::read(&path)
        .map(Some)
        .map_err(|e| backend_err(id, "state", e))
}

/// The daemon if it is alive, with the sandbox's layout.
fn daemon(entry: &Entry) -> Result<(Option<ProcessId>, Option<Layout>), SandboxError> {
    let Some(config) = daemon_config(entry.dir(), entry.id())? else {
        return Ok((None, None));
    };
    let layout = config.layout();
    let pid = ProcessId::read(&layout.vmm_file())
        .map_err(|e| backend_err(entry.id(), "state", e))?
        .filter(ProcessId::alive);
    Ok((pid, Some(layout)))
}

/// Gives the daemon or exec relay the stdio the caller chose (the shim's FIFOs);
/// unset streams stay the caller's own, as runc's container would have them.
fn with_stdio(command: &mut Command, stdio: &super::Stdio) -> std::io::Result<()> {
    if let Some(fd) = &stdio.stdin {
        command.stdin(fd.try_clone()?);
    }
    if let Some(fd) = &stdio.stdout {
        command.stdout(fd.try_clone()?);
    }
    if let Some(fd) = &stdio.stderr {
        command.stderr(fd.try_clone()?);
    }
    Ok(())
}

/// Waits for a child's ready word; on failure the child is reaped (killed if needed).
pub(super) fn await_ready(
    mut child: Child,
    reader: ready::ReadyReader,
    timeout: Duration,
    what: &'static str,
    log: &Path,
    reap_on_ok: bool,
) -> Result<i32, String> {
    match reader.wait(timeout, what, log) {
        Ok(pid) => {
            if reap_on_ok {
                // A jail's launcher exits right after reporting the jailed vmm's pid.
                // Reaping it here means that vmm has been reparented (to this process
                // when it is a subreaper, as `husk run` is) before anyone waits for it.
                let _ = child.wait();
            }
            Ok(pid)
        }
        Err(e) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            Err(e.to_string())
        }
    }
}

fn remove_dir_if_present(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A daemon that died without shutting its guest down (killed) may leave a guest that
/// still answers: the test-only host agent, with its containers. A VM dies with its
/// daemon, so its socket no longer answers and this does nothing.
fn shut_down_orphaned_guest(layout: &Layout) {
    let Ok(address) = exec::guest_address(&layout.guest_file()) else {
        return;
    };
    let connector = address.connector();
    let Ok(mut agent) = husk_protocol::client::AgentClient::connect(&*connector) else {
        return;
    };
    if agent.shutdown().is_ok() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while connector.connect(husk_protocol::CONTROL_PORT).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl VmSandbox {
    fn call(
        &self,
        entry: &Entry,
        op: &'static str,
        request: ControlRequest,
    ) -> Result<Status, SandboxError> {
        let (pid, layout) = daemon(entry)?;
        let (Some(_), Some(layout)) = (pid, layout) else {
            return Err(wrong_status(entry, Status::Stopped, op));
        };
        match control::call(&layout.control_socket(), request) {
            Ok(ControlResponse::Ok { status }) => Ok(status),
            Ok(ControlResponse::WrongStatus { status }) => Err(wrong_status(entry, status, op)),
            Ok(ControlResponse::Failed { message }) => Err(backend_err(entry.id(), op, message)),
            Ok(other) => Err(backend_err(
                entry.id(),
                op,
                format!("unexpected answer {other:?}"),
            )),
            Err(e) => Err(backend_err(entry.id(), op, e)),
        }
    }

    /// A control connection straight to the sandbox's agent, for the requests the
    /// daemon has no part in (`ps`, `update`, `events --stats`). A paused guest cannot
    /// answer, so those are refused while paused.
    ///
    /// `status` is the container's, as the caller read it: the agent answers only for a
    /// created or running container.
    fn agent(
        &self,
        entry: &Entry,
        op: &'static str,
        status: Status,
    ) -> Result<husk_protocol::client::AgentClient, SandboxError> {
        if !matches!(status, Status::Created | Status::Running) {
            return Err(wrong_status(entry, status, op));
        }
        let Some(layout) = daemon(entry)?.1 else {
            return Err(wrong_status(entry, Status::Stopped, op));
        };
        let address = exec::guest_address(&layout.guest_file())
            .map_err(|e| backend_err(entry.id(), op, e))?;
        husk_protocol::client::AgentClient::connect(&*address.connector())
            .map_err(|e| backend_err(entry.id(), op, e))
    }

    /// Asks the daemon to stop everything and waits for it to exit (killing it late).
    fn stop_daemon(&self, entry: &Entry, pid: ProcessId, layout: &Layout) {
        if let Err(e) = control::call(&layout.control_socket(), ControlRequest::Shutdown) {
            log::warn!("container {}: {e}", entry.id());
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while pid.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid.alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.pid),
                nix::sys::signal::SIGKILL,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The process for `husk exec`: the given process.json, or the container's own
/// process with the command and the options applied.
pub(super) fn exec_process(entry: &Entry, opts: &ExecOptions) -> Result<Process, SandboxError> {
    let err = |e: &dyn std::fmt::Display| backend_err(entry.id(), "exec", e);
    if let Some(path) = &opts.process {
        let text =
            std::fs::read(path).map_err(|e| err(&format!("reading {}: {e}", path.display())))?;
        return serde_json::from_slice(&text)
            .map_err(|e| err(&format!("{} is not an OCI process: {e}", path.display())));
    }
    let record = entry.read().map_err(|e| err(&e))?;
    let bundle = Bundle::load(&record.bundle).map_err(|e| err(&e))?;
    let mut process = bundle.spec.process().clone().unwrap_or_default();
    process.set_args(Some(opts.args.clone()));
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(opts.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &opts.cwd {
        process.set_cwd(cwd.clone());
    }
    let user = process.user().clone();
    let user = UserBuilder::default()
        .uid(opts.uid.unwrap_or(user.uid()))
        .gid(opts.gid.unwrap_or(user.gid()))
        .additional_gids(if opts.additional_gids.is_empty() {
            user.additional_gids().clone().unwrap_or_default()
        } else {
            opts.additional_gids.clone()
        })
        .build()
        .map_err(|e| err(&e))?;
    process.set_user(user);
    process.set_terminal(Some(opts.tty));
    if opts.no_new_privs {
        process.set_no_new_privileges(Some(true));
    }
    Ok(process)
}

/// Starts `husk vmm ARGS --ready-fd N` (a daemon or relay) with the stdio the caller
/// chose; returns it and the read end of its ready pipe.
pub(super) fn spawn_helper(
    id: &str,
    op: &'static str,
    what: &str,
    args: &[std::ffi::OsString],
    stdio: &super::Stdio,
) -> Result<(Child, ready::ReadyReader), SandboxError> {
    let (reader, writer) = ready::pipe().map_err(|e| backend_err(id, op, e))?;
    let mut command = Command::new(husk_binary(id, op)?);
    command
        .arg("vmm")
        .args(args)
        .arg("--ready-fd")
        .arg(std::os::fd::AsRawFd::as_raw_fd(&writer).to_string());
    with_stdio(&mut command, stdio).map_err(|e| backend_err(id, op, e))?;
    ready::pass_to(&mut command, &writer);
    let child = command
        .spawn()
        .map_err(|e| backend_err(id, op, format!("starting {what}: {e}")))?;
    drop(writer);
    Ok((child, reader))
}

/// Starts the exec relay of `process` in container `entry` (in the guest reached through
/// `guest_file`); returns the relay's pid once the process runs.
pub(super) fn spawn_exec_relay(
    entry: &Entry,
    guest_file: &Path,
    log: &Path,
    process: &Process,
    opts: &ExecOptions,
) -> Result<i32, SandboxError> {
    let id = entry.id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let exec_id = format!("exec-{}-{}", now.as_nanos(), std::process::id());
    let process_file = entry.dir().join(format!("{exec_id}.json"));
    let json = serde_json::to_vec(process).map_err(|e| backend_err(id, "exec", e))?;
    std::fs::write(&process_file, json).map_err(|e| backend_err(id, "exec", e))?;
    let mut args: Vec<std::ffi::OsString> = vec!["exec-relay".into(), "--guest-file".into()];
    args.push(guest_file.into());
    args.extend(["--id", id, "--exec-id", &exec_id, "--process"].map(Into::into));
    args.push(process_file.clone().into());
    if let Some(socket) = &opts.console_socket {
        args.extend(["--console-socket".into(), socket.into()]);
    }
    let spawned = spawn_helper(id, "exec", "the exec relay", &args, &opts.stdio);
    let (child, reader) = spawned.inspect_err(|_| {
        let _ = std::fs::remove_file(&process_file);
    })?;
    let result = await_ready(child, reader, EXEC_TIMEOUT, "exec relay", log, false);
    let _ = std::fs::remove_file(&process_file);
    result.map_err(|e| backend_err(id, "exec", e))
}

impl Sandbox for VmSandbox {
    fn create(
        &self,
        entry: &Entry,
        bundle: &Bundle,
        opts: &CreateOptions,
    ) -> Result<i32, SandboxError> {
        let id = entry.id();
        if opts.preserve_fds > 0 {
            return Err(SandboxError::Unsupported(format!(
                "container {id}: --preserve-fds is not supported with --isolation vm (host fds cannot cross into the guest); use --isolation container"
            )));
        }
        let guest = guest_kind(
            id,
            &opts.guest_artifacts,
            entry
                .dir()
                .parent()
                .filter(|_| !opts.no_template)
                .map(|root| root.join(TEMPLATES_DIR)),
        )?;
        // A microVM's vmm runs jailed (daemon::jailed); the test-only host agent cannot be
        // (it spawns the agent as a host process).
        let jail = matches!(guest, GuestKind::Vm { .. });
        let config = DaemonConfig {
            id: id.to_string(),
            entry: entry.dir().to_path_buf(),
            bundle: bundle.path.clone(),
            rootfs: bundle.rootfs(),
            console_socket: opts.console_socket.clone(),
            guest,
            jail,
            seccomp: opts.seccomp.to_string(),
        };
        let layout = config.layout();
        config.write().map_err(|e| backend_err(id, "create", e))?;
        let args = [
            "daemon".into(),
            "--config".into(),
            layout.config().into_os_string(),
        ];
        let (child, reader) = spawn_helper(id, "create", "the vmm daemon", &args, &opts.stdio)?;
        let jailed = layout.jailed();
        let pid = await_ready(
            child,
            reader,
            CREATE_TIMEOUT,
            "vmm daemon",
            &layout.log(),
            jailed,
        )
        .map_err(|e| backend_err(id, "create", e))?;
        let process = ProcessId::of(pid)
            .ok_or_else(|| backend_err(id, "create", "the vmm daemon exited right after create"))?;
        process
            .write(&layout.vmm_file())
            .map_err(|e| backend_err(id, "create", e))?;
        Ok(pid)
    }

    fn start(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.call(entry, "start", ControlRequest::Start).map(drop)
    }

    fn status(&self, entry: &Entry) -> Result<(Status, Option<i32>), SandboxError> {
        let (pid, layout) = daemon(entry)?;
        let (Some(pid), Some(layout)) = (pid, layout) else {
            return Ok((Status::Stopped, None));
        };
        match control::call(&layout.control_socket(), ControlRequest::State) {
            Ok(ControlResponse::Ok { status }) => Ok((status, Some(pid.pid))),
            // Exiting: the container has stopped and the guest is going down.
            _ => Ok((Status::Stopped, None)),
        }
    }

    fn kill(&self, entry: &Entry, signal: i32, all: bool) -> Result<(), SandboxError> {
        // `--all`: the agent signals every process of the container's cgroup in the guest.
        self.call(entry, "kill", ControlRequest::Kill { signal, all })
            .map(drop)
    }

    fn delete(&self, entry: &Entry, force: bool) -> Result<(), SandboxError> {
        let (pid, layout) = daemon(entry)?;
        let Some(layout) = layout else {
            return Ok(());
        };
        if let Some(pid) = pid {
            let (status, _) = self.status(entry)?;
            if matches!(status, Status::Running | Status::Paused) && !force {
                return Err(wrong_status(entry, status, "delete"));
            }
            self.stop_daemon(entry, pid, &layout);
            if pid.alive() {
                return Err(backend_err(
                    entry.id(),
                    "delete",
                    format!("the vmm daemon (pid {}) did not exit", pid.pid),
                ));
            }
        }
        shut_down_orphaned_guest(&layout);
        // The daemon may be confined (no `tc`): its network redirects are removed here.
        crate::net::guest::cleanup(&layout.host_run_dir(), &layout.name_files())
            .map_err(|e| backend_err(entry.id(), "delete", e))?;
        crate::daemon::member::remove_member_shares(&layout.share_dir(), entry.id())
            .and_then(|()| share::remove(&layout.share_dir(), &layout.rootfs_mount()))
            .map_err(|e| backend_err(entry.id(), "delete", e))?;
        if layout.jailed() {
            crate::jailer::Jail::remove(
                &layout.jail_root(),
                Path::new("/sys/fs/cgroup"),
                entry.id(),
            )
            .map_err(|e| backend_err(entry.id(), "delete", e))?;
            remove_dir_if_present(&layout.jail_root())
                .map_err(|e| backend_err(entry.id(), "delete", e))?;
        }
        // The run directory (the launcher's host side, when jailed).
        remove_dir_if_present(&layout.host_run_dir())
            .map_err(|e| backend_err(entry.id(), "delete", e))
    }

    fn exec(&self, entry: &Entry, opts: &ExecOptions) -> Result<i32, SandboxError> {
        let (status, _) = self.status(entry)?;
        if status != Status::Running {
            return Err(wrong_status(entry, status, "exec"));
        }
        let Some(layout) = daemon(entry)?.1 else {
            return Err(wrong_status(entry, Status::Stopped, "exec"));
        };
        let process = exec_process(entry, opts)?;
        spawn_exec_relay(entry, &layout.guest_file(), &layout.log(), &process, opts)
    }

    fn pids(&self, entry: &Entry) -> Result<Vec<i32>, SandboxError> {
        // The container's processes live in the guest: these are their pids there (as
        // Kata reports them), read from the container's cgroup by the agent.
        let (status, _) = self.status(entry)?;
        if status == Status::Stopped {
            return Ok(Vec::new());
        }
        self.agent(entry, "ps", status)?
            .list_processes(entry.id())
            .map_err(|e| backend_err(entry.id(), "ps", e))
    }

    fn pause(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.call(entry, "pause", ControlRequest::Pause).map(drop)
    }

    fn resume(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.call(entry, "resume", ControlRequest::Resume).map(drop)
    }

    fn stats(&self, entry: &Entry) -> Result<serde_json::Value, SandboxError> {
        let (status, _) = self.status(entry)?;
        self.agent(entry, "events", status)?
            .stats(entry.id())
            .map_err(|e| backend_err(entry.id(), "events", e))
    }

    fn runs_host_hooks(&self) -> bool {
        true
    }

    fn update(&self, entry: &Entry, resources: &LinuxResources) -> Result<(), SandboxError> {
        // The limits apply to the container's cgroup inside the guest; the VM's own size
        // (memory, vCPUs) is fixed at boot.
        let (status, _) = self.status(entry)?;
        self.agent(entry, "update", status)?
            .update_container(entry.id(), resources.clone())
            .map_err(|e| backend_err(entry.id(), "update", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_guest_artifacts_are_used_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let given = GuestArtifacts {
            kernel: Some(kernel.clone()),
            initrd: Some(initrd.clone()),
        };
        match guest_kind("c", &given, None).unwrap() {
            GuestKind::Vm {
                kernel: k,
                initrd: i,
                ..
            } => assert_eq!((k, i), (kernel, initrd)),
            other => panic!("expected a VM guest, got {other:?}"),
        }
        let missing = GuestArtifacts {
            kernel: Some(dir.path().join("nope")),
            ..given
        };
        let err = guest_kind("c", &missing, None).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("HUSK_KERNEL"), "{err}");
    }
}
