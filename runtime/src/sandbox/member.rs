//! A pod's member container when the pod's sandbox container runs in a VM: the member
//! runs in that VM, as another container of the sandbox's guest agent, joining the
//! namespaces of the sandbox container that its spec names by path (see
//! [`super::pod`]). Its host process is a `husk vmm member` ([`crate::daemon::member`]),
//! whose pid is the member's and which exits with the member's exit code; every other
//! operation goes straight to the sandbox's agent. The member's files live in its own
//! store entry (`member.json`, the member process's pid, `started`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_protocol::client::AgentClient;
use husk_protocol::messages::ProcessRef;
use oci_spec::runtime::LinuxResources;

use super::vm::{
    await_ready, backend_err, daemon_config, exec_process, spawn_exec_relay, spawn_helper,
    wrong_status,
};
use super::{CreateOptions, ExecOptions, Sandbox, SandboxError};
use crate::daemon::liveness::ProcessId;
use crate::daemon::member::{MemberConfig, MEMBER_FILE};
use crate::daemon::GuestKind;
use crate::oci::{Bundle, Entry, Status};
use crate::vmm::guest::GUEST_SHARE_DIR;

/// Creating a container in a running guest (no boot), with room for a loaded machine.
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// The member process's pid.
const PID_FILE: &str = "member.pid";
/// Present once the member was started.
const STARTED_FILE: &str = "started";

/// A member of the pod whose sandbox container is `sandbox_id`, in the store directory
/// `sandbox_dir`.
#[derive(Debug, Clone)]
pub struct MemberSandbox {
    pub sandbox_id: String,
    pub sandbox_dir: PathBuf,
}

fn config(entry: &Entry, op: &'static str) -> Result<Option<MemberConfig>, SandboxError> {
    MemberConfig::read(entry.dir()).map_err(|e| backend_err(entry.id(), op, e))
}

/// The member process, if alive.
fn member_process(entry: &Entry) -> Result<Option<ProcessId>, SandboxError> {
    Ok(ProcessId::read(&entry.dir().join(PID_FILE))
        .map_err(|e| backend_err(entry.id(), "state", e))?
        .filter(ProcessId::alive))
}

/// The sandbox's agent, for a member in `status` (only a created or running one is there).
fn agent(entry: &Entry, op: &'static str, status: Status) -> Result<AgentClient, SandboxError> {
    if !matches!(status, Status::Created | Status::Running) {
        return Err(wrong_status(entry, status, op));
    }
    let Some(config) = config(entry, op)? else {
        return Err(wrong_status(entry, Status::Stopped, op));
    };
    config.agent().map_err(|e| backend_err(entry.id(), op, e))
}

impl MemberSandbox {
    /// The member's view of its sandbox: where its share is, how to reach its agent.
    fn member_config(
        &self,
        entry: &Entry,
        bundle: &Bundle,
        opts: &CreateOptions,
    ) -> Result<MemberConfig, SandboxError> {
        let id = entry.id();
        let not_running = || {
            backend_err(
                id,
                "create",
                format!(
                    "its pod's sandbox container {} is not running: start the sandbox first",
                    self.sandbox_id
                ),
            )
        };
        let sandbox =
            daemon_config(&self.sandbox_dir, &self.sandbox_id)?.ok_or_else(not_running)?;
        let layout = sandbox.layout();
        let alive = ProcessId::read(&layout.vmm_file())
            .map_err(|e| backend_err(id, "create", e))?
            .is_some_and(|p| p.alive());
        if !alive {
            return Err(not_running());
        }
        let guest_share_dir = match sandbox.guest {
            // The test-only host agent sees the share where it is on the host.
            GuestKind::HostAgent { .. } => layout.share_dir(),
            GuestKind::Vm { .. } => PathBuf::from(GUEST_SHARE_DIR),
        };
        Ok(MemberConfig {
            id: id.to_string(),
            sandbox_id: self.sandbox_id.clone(),
            bundle: bundle.path.clone(),
            rootfs: bundle.rootfs(),
            console_socket: opts.console_socket.clone(),
            share_dir: layout.share_dir(),
            guest_share_dir,
            guest_file: layout.guest_file(),
            log: layout.log(),
        })
    }

    /// Waits up to `timeout` for the member process to exit.
    fn await_exit(pid: &ProcessId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while pid.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        !pid.alive()
    }
}

impl Sandbox for MemberSandbox {
    fn create(
        &self,
        entry: &Entry,
        bundle: &Bundle,
        opts: &CreateOptions,
    ) -> Result<i32, SandboxError> {
        let id = entry.id();
        if opts.preserve_fds > 0 {
            return Err(SandboxError::Unsupported(format!(
                "container {id}: --preserve-fds is not supported in a VM pod (host fds cannot cross into the guest)"
            )));
        }
        let config = self.member_config(entry, bundle, opts)?;
        config
            .write(entry.dir())
            .map_err(|e| backend_err(id, "create", e))?;
        let args = [
            "member".into(),
            "--config".into(),
            entry.dir().join(MEMBER_FILE).into_os_string(),
        ];
        let (child, reader) = spawn_helper(id, "create", "the member process", &args, &opts.stdio)?;
        let pid = await_ready(
            child,
            reader,
            CREATE_TIMEOUT,
            "pod member",
            &config.log,
            false,
        )
        .map_err(|e| backend_err(id, "create", e))?;
        let process = ProcessId::of(pid).ok_or_else(|| {
            backend_err(id, "create", "the member process exited right after create")
        })?;
        process
            .write(&entry.dir().join(PID_FILE))
            .map_err(|e| backend_err(id, "create", e))?;
        Ok(pid)
    }

    fn start(&self, entry: &Entry) -> Result<(), SandboxError> {
        let (status, _) = self.status(entry)?;
        if status != Status::Created {
            return Err(wrong_status(entry, status, "start"));
        }
        agent(entry, "start", status)?
            .start_container(entry.id())
            .map_err(|e| backend_err(entry.id(), "start", e))?;
        std::fs::write(entry.dir().join(STARTED_FILE), b"")
            .map_err(|e| backend_err(entry.id(), "start", e))
    }

    fn status(&self, entry: &Entry) -> Result<(Status, Option<i32>), SandboxError> {
        let Some(pid) = member_process(entry)? else {
            return Ok((Status::Stopped, None));
        };
        let status = if entry.dir().join(STARTED_FILE).exists() {
            Status::Running
        } else {
            Status::Created
        };
        Ok((status, Some(pid.pid)))
    }

    fn kill(&self, entry: &Entry, signal: i32, all: bool) -> Result<(), SandboxError> {
        let (status, _) = self.status(entry)?;
        let mut agent = agent(entry, "kill", status)?;
        let sent = if all {
            agent.signal_container(entry.id(), signal)
        } else {
            let init = ProcessRef {
                container_id: entry.id().to_string(),
                exec_id: None,
            };
            agent.signal_process(init, signal)
        };
        sent.map_err(|e| backend_err(entry.id(), "kill", e))
    }

    fn delete(&self, entry: &Entry, force: bool) -> Result<(), SandboxError> {
        let Some(config) = config(entry, "delete")? else {
            return Ok(());
        };
        let (status, _) = self.status(entry)?;
        if status != Status::Stopped && !force {
            return Err(wrong_status(entry, status, "delete"));
        }
        // The agent kills what still runs and forgets the container. A sandbox that is
        // gone took the member with it: nothing to ask.
        if let Ok(mut agent) = config.agent() {
            if let Err(e) = agent.delete_container(entry.id(), true) {
                log::debug!("container {}: the agent's delete: {e}", entry.id());
            }
        }
        if let Some(pid) = member_process(entry)? {
            if !Self::await_exit(&pid, Duration::from_secs(30)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid.pid),
                    nix::sys::signal::SIGKILL,
                );
                if !Self::await_exit(&pid, Duration::from_secs(10)) {
                    return Err(backend_err(
                        entry.id(),
                        "delete",
                        format!("the member process (pid {}) did not exit", pid.pid),
                    ));
                }
            }
        }
        config
            .remove_share()
            .map_err(|e| backend_err(entry.id(), "delete", e))
    }

    fn exec(&self, entry: &Entry, opts: &ExecOptions) -> Result<i32, SandboxError> {
        let (status, _) = self.status(entry)?;
        if status != Status::Running {
            return Err(wrong_status(entry, status, "exec"));
        }
        let Some(config) = config(entry, "exec")? else {
            return Err(wrong_status(entry, Status::Stopped, "exec"));
        };
        let process = exec_process(entry, opts)?;
        spawn_exec_relay(entry, &config.guest_file, &config.log, &process, opts)
    }

    fn pids(&self, entry: &Entry) -> Result<Vec<i32>, SandboxError> {
        let (status, _) = self.status(entry)?;
        if status == Status::Stopped {
            return Ok(Vec::new());
        }
        agent(entry, "ps", status)?
            .list_processes(entry.id())
            .map_err(|e| backend_err(entry.id(), "ps", e))
    }

    fn pause(&self, entry: &Entry) -> Result<(), SandboxError> {
        Err(self.whole_pod_only(entry, "pause"))
    }

    fn resume(&self, entry: &Entry) -> Result<(), SandboxError> {
        Err(self.whole_pod_only(entry, "resume"))
    }

    fn stats(&self, entry: &Entry) -> Result<serde_json::Value, SandboxError> {
        let (status, _) = self.status(entry)?;
        agent(entry, "events", status)?
            .stats(entry.id())
            .map_err(|e| backend_err(entry.id(), "events", e))
    }

    fn runs_host_hooks(&self) -> bool {
        true
    }

    fn update(&self, entry: &Entry, resources: &LinuxResources) -> Result<(), SandboxError> {
        let (status, _) = self.status(entry)?;
        agent(entry, "update", status)?
            .update_container(entry.id(), resources.clone())
            .map_err(|e| backend_err(entry.id(), "update", e))
    }
}

impl MemberSandbox {
    /// Pausing freezes the VM's vCPUs: a pod is paused as a whole, through its sandbox.
    fn whole_pod_only(&self, entry: &Entry, op: &str) -> SandboxError {
        SandboxError::Unsupported(format!(
            "container {}: cannot {op} one container of a VM pod (its containers share one VM): {op} the pod's sandbox container {}",
            entry.id(),
            self.sandbox_id
        ))
    }
}
