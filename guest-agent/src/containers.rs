//! Containers and their processes, created with youki's libcontainer.
//!
//! Each container gets a bundle directory (`<state>/bundles/<id>/config.json`, the spec
//! the host sent with `root.path` set to the rootfs it named) and libcontainer's state
//! under `<state>/containers`. libcontainer builds are serialised by the reaper's spawn
//! guard (see `reaper.rs`): they fork with a raw `clone3` and change the process-wide
//! working directory for console sockets, neither of which is safe to overlap.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use husk_protocol::messages::{ProcessRef, StdioPorts, StdioRequest};
use husk_protocol::{AgentError, ExitStatus, Response};
use husk_workload::CleanSignalsExecutor;
use libcgroups::common::CgroupManager;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::console::{resize, start_pty_relay, ConsoleSocket};
use crate::ports::PortAllocator;
use crate::reaper::Reaper;
use crate::stdio::{ChildStdio, PipeStdio};
use crate::transport::Transport;

/// How long `DeleteContainer` waits for a killed init to be reaped.
const DELETE_REAP_TIMEOUT: Duration = Duration::from_secs(10);

struct ContainerEntry {
    container: Container,
    init_pid: Pid,
    execs: HashMap<String, Pid>,
    /// Pty masters by exec id (`None`: the init), kept for `ResizePty`.
    ptys: HashMap<Option<String>, OwnedFd>,
}

/// A new process's stdio before it exists: pipes, or a console socket for a pty.
enum PreparedStdio {
    Pipes(PipeStdio, ChildStdio),
    Console(ConsoleSocket),
}

impl PreparedStdio {
    /// Hands the process's ends to libcontainer.
    fn attach(self, builder: ContainerBuilder) -> (ContainerBuilder, Finish) {
        match self {
            PreparedStdio::Pipes(ours, child) => {
                let builder = builder
                    .with_stdin(child.stdin)
                    .with_stdout(child.stdout)
                    .with_stderr(child.stderr);
                (builder, Finish::Pipes(ours))
            }
            PreparedStdio::Console(console) => {
                let builder = builder.with_console_socket(Some(&console.path));
                (builder, Finish::Console(console))
            }
        }
    }
}

/// The agent's side of a new process's stdio, finished once the process exists.
enum Finish {
    Pipes(PipeStdio),
    Console(ConsoleSocket),
}

impl Finish {
    /// Starts the relays; returns the ports and, for a pty, its master (for resizing).
    fn start(self, agent: &Agent) -> AgentResult<(StdioPorts, Option<OwnedFd>)> {
        match self {
            Finish::Pipes(ours) => {
                let ports = ours.ports;
                ours.start_relays();
                Ok((ports, None))
            }
            Finish::Console(console) => {
                let master = console
                    .master()
                    .map_err(|e| io_error("receiving the pty".into(), e))?;
                let (port, for_resize) = start_pty_relay(&*agent.transport, &agent.ports, master)
                    .map_err(|e| io_error("relaying the pty".into(), e))?;
                Ok((
                    StdioPorts {
                        pty: Some(port),
                        ..StdioPorts::default()
                    },
                    Some(for_resize),
                ))
            }
        }
    }
}

/// Everything the request handlers share.
pub struct Agent {
    transport: Arc<dyn Transport>,
    ports: PortAllocator,
    pub reaper: Arc<Reaper>,
    state_root: PathBuf,
    bundles_root: PathBuf,
    console_root: PathBuf,
    /// `GLIBC_TUNABLES` to hand on to container processes (see [`crate::vector_state`]).
    vector_tunables: Option<String>,
    /// `None` while a container with that id is being created.
    containers: Mutex<HashMap<String, Option<ContainerEntry>>>,
}

type AgentResult<T> = Result<T, AgentError>;

impl Agent {
    pub fn new(
        transport: Arc<dyn Transport>,
        reaper: Arc<Reaper>,
        state_dir: &Path,
    ) -> AgentResult<Self> {
        let state_root = state_dir.join("containers");
        let bundles_root = state_dir.join("bundles");
        let console_root = state_dir.join("console");
        for dir in [&state_root, &bundles_root, &console_root] {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        }
        Ok(Self {
            transport,
            ports: PortAllocator::default(),
            reaper,
            state_root,
            bundles_root,
            console_root,
            vector_tunables: crate::vector_state::inherited_tunables(),
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// Keeps glibc in the process off AVX state the guest kernel cannot save (PVM hosts).
    fn add_vector_tunables(&self, process: &mut Process) {
        if self.vector_tunables.is_none() {
            return;
        }
        let mut env = process.env().clone().unwrap_or_default();
        crate::vector_state::add_tunables(&mut env, self.vector_tunables.as_deref());
        process.set_env(Some(env));
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Option<ContainerEntry>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a ready container, holding the table lock (keep `f` short).
    fn with_container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerEntry) -> AgentResult<T>,
    ) -> AgentResult<T> {
        match self.table().get_mut(id) {
            Some(Some(entry)) => f(entry),
            _ => Err(AgentError::ContainerNotFound { id: id.to_owned() }),
        }
    }

    fn prepare_stdio(
        &self,
        terminal: bool,
        stdio: StdioRequest,
        name: &str,
    ) -> AgentResult<PreparedStdio> {
        if terminal {
            let console = ConsoleSocket::bind(&self.console_root, name)
                .map_err(|e| io_error("creating the console socket".into(), e))?;
            return Ok(PreparedStdio::Console(console));
        }
        let (ours, child) = PipeStdio::prepare(&*self.transport, &self.ports, stdio)
            .map_err(|e| io_error("preparing stdio".into(), e))?;
        Ok(PreparedStdio::Pipes(ours, child))
    }

    pub fn create_container(
        &self,
        id: &str,
        mut spec: Spec,
        rootfs: &Path,
        stdio: StdioRequest,
        pod_sandbox: Option<&str>,
    ) -> AgentResult<Response> {
        validate_spec(&spec, rootfs)?;
        if let Some(sandbox) = pod_sandbox {
            let sandbox_init = self.with_container(sandbox, |entry| Ok(entry.init_pid))?;
            join_pod_namespaces(&mut spec, sandbox_init.as_raw());
        }
        {
            let mut table = self.table();
            if table.contains_key(id) {
                return Err(AgentError::ContainerExists { id: id.to_owned() });
            }
            table.insert(id.to_owned(), None);
        }
        let result = self.build_container(id, &mut spec, rootfs, stdio);
        let mut table = self.table();
        match result {
            Ok((entry, response)) => {
                table.insert(id.to_owned(), Some(entry));
                Ok(response)
            }
            Err(e) => {
                table.remove(id);
                let _ = std::fs::remove_dir_all(self.bundles_root.join(id));
                Err(e)
            }
        }
    }

    fn build_container(
        &self,
        id: &str,
        spec: &mut Spec,
        rootfs: &Path,
        stdio: StdioRequest,
    ) -> AgentResult<(ContainerEntry, Response)> {
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let bundle = self.bundles_root.join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| io_error(format!("creating {}", bundle.display()), e))?;
        if let Some(root) = spec.root_mut() {
            root.set_path(rootfs.to_path_buf());
        }
        if let Some(process) = spec.process_mut() {
            self.add_vector_tunables(process);
        }
        spec.save(bundle.join("config.json"))
            .map_err(|e| AgentError::InvalidSpec { reason: chain(&e) })?;

        let prepared = self.prepare_stdio(terminal, stdio, id)?;
        let guard = self.reaper.spawn_guard();
        let (container, finish) = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_executor(CleanSignalsExecutor)
            .validate_id()
            .and_then(|b| b.with_root_path(&self.state_root))
            .and_then(|b| {
                let (b, finish) = prepared.attach(b);
                let container = b
                    .as_init(&bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()?;
                Ok((container, finish))
            })
            .map_err(runtime_error)?;
        let init_pid = container.pid().ok_or_else(|| AgentError::Internal {
            message: format!("libcontainer created {id} without an init pid"),
        })?;
        guard.watch(init_pid);
        drop(guard);
        if needs_loopback(spec) {
            if let Err(e) = crate::network::loopback_up_in(init_pid.as_raw()) {
                let _ = container_delete(container);
                return Err(io_error("the container's loopback".into(), e));
            }
        }
        let mut entry = ContainerEntry {
            container,
            init_pid,
            execs: HashMap::new(),
            ptys: HashMap::new(),
        };
        let (ports, pty) = match finish.start(self) {
            Ok(started) => started,
            Err(e) => {
                let _ = entry.container.delete(true);
                return Err(e);
            }
        };
        if let Some(master) = pty {
            entry.ptys.insert(None, master);
        }
        Ok((
            entry,
            Response::Spawned {
                pid: init_pid.as_raw(),
                stdio: ports,
            },
        ))
    }

    pub fn start_container(&self, id: &str) -> AgentResult<Response> {
        self.with_container(id, |entry| {
            entry.container.start().map_err(runtime_error)?;
            Ok(Response::Done)
        })
    }

    pub fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        mut process: Process,
        stdio: StdioRequest,
    ) -> AgentResult<Response> {
        self.add_vector_tunables(&mut process);
        let terminal = process.terminal().unwrap_or(false);
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(AgentError::InvalidSpec {
                reason: "process.args is empty: name the program to run".into(),
            });
        }
        let process_file = self.with_container(container_id, |entry| {
            if entry.execs.contains_key(exec_id) {
                return Err(AgentError::ProcessExists {
                    container_id: container_id.to_owned(),
                    exec_id: exec_id.to_owned(),
                });
            }
            if exec_id.contains('/') || exec_id.is_empty() {
                return Err(AgentError::InvalidRequest {
                    reason: format!("exec id {exec_id:?} must be non-empty and contain no '/'"),
                });
            }
            Ok(self
                .bundles_root
                .join(container_id)
                .join(format!("exec-{exec_id}.json")))
        })?;
        let json = serde_json::to_vec(&process).map_err(|e| AgentError::InvalidSpec {
            reason: e.to_string(),
        })?;
        std::fs::write(&process_file, json)
            .map_err(|e| io_error(format!("writing {}", process_file.display()), e))?;

        let prepared = self.prepare_stdio(terminal, stdio, &format!("{container_id}-{exec_id}"))?;
        let guard = self.reaper.spawn_guard();
        let built = ContainerBuilder::new(container_id.to_owned(), SyscallType::default())
            .with_executor(CleanSignalsExecutor)
            .with_root_path(&self.state_root)
            .and_then(|b| {
                let (b, finish) = prepared.attach(b);
                let pid = b
                    .as_tenant()
                    .with_process(Some(&process_file))
                    .with_detach(true)
                    .build()?;
                Ok((pid, finish))
            });
        let _ = std::fs::remove_file(&process_file);
        let (pid, finish) = built.map_err(runtime_error)?;
        guard.watch(pid);
        drop(guard);
        let (ports, pty) = finish.start(self).inspect_err(|_| {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        })?;

        let registered = self.with_container(container_id, |entry| {
            entry.execs.insert(exec_id.to_owned(), pid);
            if let Some(master) = pty {
                entry.ptys.insert(Some(exec_id.to_owned()), master);
            }
            Ok(())
        });
        if let Err(e) = registered {
            // The container was deleted while we spawned: do not leave the process behind.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
        Ok(Response::Spawned {
            pid: pid.as_raw(),
            stdio: ports,
        })
    }

    fn pid_of(&self, process: &ProcessRef) -> AgentResult<Pid> {
        self.with_container(&process.container_id, |entry| match &process.exec_id {
            None => Ok(entry.init_pid),
            Some(exec_id) => {
                entry
                    .execs
                    .get(exec_id)
                    .copied()
                    .ok_or_else(|| AgentError::ProcessNotFound {
                        container_id: process.container_id.clone(),
                        exec_id: exec_id.clone(),
                    })
            }
        })
    }

    pub fn signal_process(&self, process: &ProcessRef, signal: i32) -> AgentResult<Response> {
        let sig = signal_from(signal)?;
        let pid = self.pid_of(process)?;
        // An exited (and reaped) pid may belong to someone else by now: never signal it.
        if self.reaper.try_status(pid).is_some() {
            return Ok(Response::Done);
        }
        match nix::sys::signal::kill(pid, sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(Response::Done),
            Err(e) => Err(io_error(format!("sending signal {signal} to pid {pid}"), e)),
        }
    }

    pub fn wait_process(&self, process: &ProcessRef) -> AgentResult<Response> {
        let pid = self.pid_of(process)?;
        let status: ExitStatus =
            self.reaper
                .wait(pid, None)
                .ok_or_else(|| AgentError::Internal {
                    message: "waiting without a timeout returned nothing".into(),
                })?;
        Ok(Response::Exited { status })
    }

    pub fn resize_pty(&self, process: &ProcessRef, rows: u16, cols: u16) -> AgentResult<Response> {
        self.pid_of(process)?;
        self.with_container(&process.container_id, |entry| {
            let master =
                entry
                    .ptys
                    .get(&process.exec_id)
                    .ok_or_else(|| AgentError::InvalidRequest {
                        reason: "the process has no terminal (process.terminal was false)".into(),
                    })?;
            resize(master, rows, cols).map_err(|e| io_error("resizing the pty".into(), e))?;
            Ok(Response::Done)
        })
    }

    /// The libcgroups manager of the container's cgroup in the guest.
    fn cgroup_manager(&self, id: &str) -> AgentResult<libcgroups::common::AnyCgroupManager> {
        let cgroup_path = self.with_container(id, |entry| {
            Ok(entry.container.spec().map_err(runtime_error)?.cgroup_path)
        })?;
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path,
            systemd_cgroup: false,
            container_name: id.to_owned(),
        })
        .map_err(|e| AgentError::Runtime { message: chain(&e) })
    }

    pub fn stats(&self, id: &str) -> AgentResult<Response> {
        let stats = self
            .cgroup_manager(id)?
            .stats()
            .map_err(|e| AgentError::Runtime { message: chain(&e) })?;
        let stats = serde_json::to_value(stats).map_err(|e| AgentError::Internal {
            message: e.to_string(),
        })?;
        Ok(Response::Stats { stats })
    }

    /// Every process in the container's cgroup (its init, its children, its execs).
    fn cgroup_pids(&self, id: &str) -> AgentResult<Vec<Pid>> {
        self.cgroup_manager(id)?
            .get_all_pids()
            .map_err(|e| AgentError::Runtime { message: chain(&e) })
    }

    pub fn list_processes(&self, id: &str) -> AgentResult<Response> {
        let mut pids: Vec<i32> = self.cgroup_pids(id)?.iter().map(|p| p.as_raw()).collect();
        pids.sort_unstable();
        Ok(Response::Processes { pids })
    }

    /// `kill --all`: the signal goes to each process of the cgroup. A process that ends
    /// meanwhile is no error; one forked meanwhile may be missed, as with runc's
    /// unfrozen `kill --all`.
    pub fn signal_container(&self, id: &str, signal: i32) -> AgentResult<Response> {
        let sig = signal_from(signal)?;
        for pid in self.cgroup_pids(id)? {
            match nix::sys::signal::kill(pid, sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(io_error(format!("sending signal {signal} to pid {pid}"), e)),
            }
        }
        Ok(Response::Done)
    }

    /// `update`: new cgroup limits for a running container.
    pub fn update_container(&self, id: &str, resources: &LinuxResources) -> AgentResult<Response> {
        let options = libcgroups::common::ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.cgroup_manager(id)?
            .apply(&options)
            .map_err(|e| AgentError::Runtime { message: chain(&e) })?;
        Ok(Response::Done)
    }

    pub fn delete_container(&self, id: &str, force: bool) -> AgentResult<Response> {
        let mut entry = match self.table().remove(id) {
            Some(Some(entry)) => entry,
            Some(None) => {
                // Being created: put the reservation back.
                self.table().insert(id.to_owned(), None);
                return Err(AgentError::InvalidRequest {
                    reason: format!("container {id} is still being created"),
                });
            }
            None => return Err(AgentError::ContainerNotFound { id: id.to_owned() }),
        };
        if let Err(e) = entry.container.delete(force) {
            let error = runtime_error(e);
            self.table().insert(id.to_owned(), Some(entry));
            return Err(error);
        }
        // Report only once the init is gone, so the host can clean up after us.
        if self
            .reaper
            .wait(entry.init_pid, Some(DELETE_REAP_TIMEOUT))
            .is_none()
        {
            crate::init::log(&format!(
                "container {id}: init {} not reaped after delete",
                entry.init_pid
            ));
        }
        self.reaper.forget(entry.init_pid);
        for pid in entry.execs.values() {
            self.reaper.forget(*pid);
        }
        let _ = std::fs::remove_dir_all(self.bundles_root.join(id));
        Ok(Response::Done)
    }

    /// Force-deletes every container (for `Shutdown`).
    pub fn delete_all(&self) {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.delete_container(&id, true) {
                crate::init::log(&format!("deleting container {id} at shutdown failed: {e}"));
            }
        }
    }
}

/// The signal numbered `signal`, or the request's error.
fn signal_from(signal: i32) -> AgentResult<nix::sys::signal::Signal> {
    nix::sys::signal::Signal::try_from(signal).map_err(|_| AgentError::InvalidRequest {
        reason: format!("{signal} is not a signal number"),
    })
}

/// A new network namespace (no path) gets its loopback up, as with runc; in the
/// guest's own namespace (no entry) `ConfigureNetwork` brings it up.
fn needs_loopback(spec: &Spec) -> bool {
    use oci_spec::runtime::LinuxNamespaceType;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|namespaces| {
            namespaces
                .iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Network && ns.path().is_none())
        })
}

/// A pod member's namespaces as the guest has them: each namespace the spec names by
/// path (the host's path of the pod's namespace, meaningless in the guest) becomes the
/// pod sandbox container's namespace of that kind, `/proc/<its init>/ns/<kind>`.
/// Namespaces without a path stay new ones, as the member's spec asks.
fn join_pod_namespaces(spec: &mut Spec, sandbox_init: i32) {
    use oci_spec::runtime::LinuxNamespaceType as Kind;
    let Some(namespaces) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    else {
        return;
    };
    for ns in namespaces.iter_mut().filter(|ns| ns.path().is_some()) {
        let name = match ns.typ() {
            Kind::Mount => "mnt",
            Kind::Cgroup => "cgroup",
            Kind::Uts => "uts",
            Kind::Ipc => "ipc",
            Kind::User => "user",
            Kind::Pid => "pid",
            Kind::Network => "net",
            Kind::Time => "time",
        };
        ns.set_path(Some(PathBuf::from(format!(
            "/proc/{sandbox_init}/ns/{name}"
        ))));
    }
}

fn container_delete(mut container: Container) -> Result<(), LibcontainerError> {
    container.delete(true)
}

/// Checks what libcontainer would otherwise reject with a less helpful message.
fn validate_spec(spec: &Spec, rootfs: &Path) -> AgentResult<()> {
    let invalid = |reason: String| Err(AgentError::InvalidSpec { reason });
    if !spec.version().starts_with("1.") {
        return invalid(format!("ociVersion {:?} is not 1.x", spec.version()));
    }
    let Some(process) = spec.process() else {
        return invalid("no process section: name the program to run in process.args".into());
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return invalid("process.args is empty: name the program to run".into());
    }
    if spec.linux().is_none() {
        return invalid("no linux section (namespaces, masked paths, ...)".into());
    }
    if !rootfs.is_absolute() || !rootfs.is_dir() {
        return invalid(format!(
            "rootfs {} is not an absolute path to a directory",
            rootfs.display()
        ));
    }
    Ok(())
}

fn runtime_error(e: LibcontainerError) -> AgentError {
    match e {
        LibcontainerError::InvalidID(_)
        | LibcontainerError::InvalidSpec(_)
        | LibcontainerError::MissingSpec(_)
        | LibcontainerError::Spec(_) => AgentError::InvalidSpec { reason: chain(&e) },
        e => AgentError::Runtime { message: chain(&e) },
    }
}

fn io_error(context: String, e: impl std::error::Error) -> AgentError {
    AgentError::Io {
        context,
        message: chain(&e),
    }
}

/// An error and all its sources on one line: libcontainer's top-level messages alone
/// ("io error", "syscall error") do not say what failed.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, SpecBuilder};

    use super::*;

    #[test]
    fn a_pod_member_joins_the_sandbox_namespaces_it_names_by_path() {
        let ns = |typ, path: Option<&str>| {
            let b = LinuxNamespaceBuilder::default().typ(typ);
            match path {
                Some(p) => b.path(p).build().unwrap(),
                None => b.build().unwrap(),
            }
        };
        let mut spec = SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(vec![
                        ns(LinuxNamespaceType::Mount, None),
                        ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
                        ns(LinuxNamespaceType::Ipc, Some("/proc/4242/ns/ipc")),
                        ns(LinuxNamespaceType::Uts, Some("/proc/4242/ns/uts")),
                        ns(LinuxNamespaceType::Pid, None),
                    ])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        join_pod_namespaces(&mut spec, 7);
        let got: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            got,
            [
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Network, Some("/proc/7/ns/net".into())),
                (LinuxNamespaceType::Ipc, Some("/proc/7/ns/ipc".into())),
                (LinuxNamespaceType::Uts, Some("/proc/7/ns/uts".into())),
                (LinuxNamespaceType::Pid, None),
            ]
        );
    }
}
