//! The shim's tasks: each container (and its exec processes) that this shim instance
//! serves, run through the husk library's lifecycle (`husk::sandbox::lifecycle`), which
//! picks the isolation level per container (annotation `io.husk.isolation`, else the
//! shim's `HUSK_ISOLATION`, else a microVM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::protos::api::Mount;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use husk::oci::{Isolation, Status, Store, StoreError};
use husk::sandbox::lifecycle::{self, LifecycleError};
use husk::sandbox::{CreateOptions, ExecOptions, SandboxError};
use oci_spec::runtime::LinuxResources;

use crate::events::Events;
use crate::pod::Role;
use crate::process::{Exit, Process};
use crate::rootfs::{self, RootfsError};
use crate::stdio::{self, Paths, StdioError};
use crate::tty::{self, ConsoleSocket, TtyError};

/// Exit status reported for a process the shim had to kill itself (SIGKILL).
const KILLED: u32 = 128 + 9;

/// Errors of task operations.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TaskError {
    /// task {0} not found in this shim
    NotFound(String),
    /// process {exec_id} of task {id} not found
    ExecNotFound { id: String, exec_id: String },
    /// task {0} already exists
    Exists(String),
    /// process {exec_id} already exists in task {id}: pick another exec id
    ExecExists { id: String, exec_id: String },
    /// process {0} has already finished
    Finished(String),
    /// task {0} is still running: kill it before deleting it
    Running(String),
    /// the {what} sent for {id} is not valid JSON of that type: {message}
    BadSpec {
        id: String,
        what: &'static str,
        message: String,
    },
    /// writing the exec spec {path:?} failed: {source}
    ExecSpec {
        path: PathBuf,
        source: std::io::Error,
    },
    /// checkpoint/restore is not supported by husk
    Checkpoint,
    /// the shim's environment sets HUSK_ISOLATION={0:?}: use vm or container (or unset it: vm), in the containerd config's shim environment
    BadIsolationEnv(String),
    /// {0}
    Lifecycle(#[from] LifecycleError),
    /// {0}
    Stdio(#[from] StdioError),
    /// {0}
    Tty(#[from] TtyError),
    /// {0}
    Rootfs(#[from] RootfsError),
}

/// A process started with `Exec`, before and after `Start`.
struct Exec {
    process: Arc<Process>,
    paths: Paths,
    /// The OCI `process` JSON containerd sent.
    spec: Vec<u8>,
}

/// One container of this shim.
struct Container {
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Arc<Process>,
    paths: Paths,
    execs: Mutex<HashMap<String, Exec>>,
}

/// What `State` reports.
pub struct ProcessState {
    pub pid: u32,
    pub status: Status,
    pub exit: Option<Exit>,
    pub bundle: PathBuf,
    pub paths: Paths,
}

/// All tasks of this shim instance.
pub struct Tasks {
    store: Store,
    events: Arc<Events>,
    isolation: Option<Isolation>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

/// The shim's default isolation level, which the annotation `io.husk.isolation` of a
/// container overrides: `HUSK_ISOLATION` from the shim's environment (containerd's), else
/// none, which means the library's default, a microVM: a sandboxing runtime isolates
/// unless told otherwise.
pub fn default_isolation() -> Result<Option<Isolation>, TaskError> {
    parse_isolation(std::env::var("HUSK_ISOLATION").ok())
}

fn parse_isolation(value: Option<String>) -> Result<Option<Isolation>, TaskError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| TaskError::BadIsolationEnv(v)),
    }
}

/// Where the shim keeps husk's state: `$HUSK_SHIM_ROOT/<namespace>` (default
/// `/run/husk-shim/<namespace>`), so containers of different namespaces never collide.
pub fn store_root(namespace: &str) -> PathBuf {
    let base = std::env::var_os("HUSK_SHIM_ROOT").unwrap_or_else(|| "/run/husk-shim".into());
    Path::new(&base).join(namespace)
}

impl Tasks {
    pub fn new(events: Events) -> Result<Self, TaskError> {
        let store = Store::open(&store_root(events.namespace())).map_err(LifecycleError::from)?;
        let isolation = default_isolation()?;
        Ok(Tasks {
            store,
            events: Arc::new(events),
            isolation,
            containers: Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(id.to_string()))
    }

    fn exec_process(
        &self,
        c: &Container,
        id: &str,
        exec_id: &str,
    ) -> Result<Arc<Process>, TaskError> {
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .map(|e| Arc::clone(&e.process))
            .ok_or_else(|| TaskError::ExecNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })
    }

    /// The process `exec_id` of task `id` (the init process when `exec_id` is empty).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, TaskError> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            Ok(Arc::clone(&c.init))
        } else {
            self.exec_process(&c, id, exec_id)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Creates the container; its process waits for `Start`. Returns its pid.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        mounts: &[Mount],
        paths: Paths,
    ) -> Result<u32, TaskError> {
        if self.map().contains_key(id) {
            return Err(TaskError::Exists(id.to_string()));
        }
        let role = Role::of(id, &crate::pod::annotations(bundle));
        if let Role::Member { sandbox_id } = &role {
            if !self.map().contains_key(sandbox_id) {
                log::warn!(
                    "{id}: its pod's sandbox container {sandbox_id} is not served by this shim"
                );
            }
        }
        let mounted = rootfs::mount(bundle, mounts)?;
        let created = self.create_mounted(id, bundle, &paths);
        let (pid, init) = match created {
            Ok(v) => v,
            Err(e) => {
                if mounted {
                    rootfs::unmount(bundle);
                }
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            bundle: bundle.to_path_buf(),
            rootfs_mounted: mounted,
            init: Arc::clone(&init),
            paths: paths.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        self.map().insert(id.to_string(), container);
        let events = Arc::clone(&self.events);
        let cid = id.to_string();
        init.watch(pid, move |pid, exit| {
            events.publish(exit_event(&cid, &cid, pid, exit));
        });
        self.events.publish(TaskCreate {
            container_id: id.to_string(),
            bundle: bundle.to_string_lossy().into_owned(),
            rootfs: mounts.to_vec(),
            io: Some(TaskIO {
                stdin: paths.stdin.clone(),
                stdout: paths.stdout.clone(),
                stderr: paths.stderr.clone(),
                terminal: paths.terminal,
                ..Default::default()
            })
            .into(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(pid as u32)
    }

    fn create_mounted(
        &self,
        id: &str,
        bundle: &Path,
        paths: &Paths,
    ) -> Result<(i32, Arc<Process>), TaskError> {
        let mut opts = CreateOptions::default();
        let console = if paths.terminal {
            let socket = ConsoleSocket::bind(bundle, "init")?;
            opts.console_socket = Some(socket.path().to_path_buf());
            Some(socket)
        } else {
            let (stdio, io) = stdio::open(paths)?;
            opts.stdio = stdio;
            return self.create_with(id, bundle, &opts, io);
        };
        let pid = lifecycle::create(&self.store, id, bundle, self.isolation, &opts, None)?;
        let io = console
            .as_ref()
            .map(|s| s.receive().and_then(|master| tty::relay(master, paths)))
            .transpose();
        match io {
            Ok(io) => Ok((pid, Process::new(io.unwrap_or_default()))),
            Err(e) => {
                let _ = lifecycle::delete(&self.store, id, true);
                Err(e.into())
            }
        }
    }

    fn create_with(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CreateOptions,
        io: stdio::Io,
    ) -> Result<(i32, Arc<Process>), TaskError> {
        let pid = lifecycle::create(&self.store, id, bundle, self.isolation, opts, None)?;
        Ok((pid, Process::new(io)))
    }

    /// Starts the container's process, or a process added with `exec`.
    pub fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            lifecycle::start(&self.store, id)?;
            let pid = c.init.pid().unwrap_or(0) as u32;
            self.events.publish(TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            });
            return Ok(pid);
        }
        let (process, paths, spec) = {
            let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            let exec = execs.get(exec_id).ok_or_else(|| TaskError::ExecNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
            (
                Arc::clone(&exec.process),
                exec.paths.clone(),
                exec.spec.clone(),
            )
        };
        let spec_path = c.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&spec_path, &spec).map_err(|source| TaskError::ExecSpec {
            path: spec_path.clone(),
            source,
        })?;
        let result = self.start_exec(id, exec_id, &c.bundle, &spec_path, &paths);
        let _ = std::fs::remove_file(&spec_path);
        let (pid, io) = match result {
            Ok(v) => v,
            Err(e) => {
                process.set_exited(KILLED);
                return Err(e);
            }
        };
        *process.io.lock().unwrap_or_else(|e| e.into_inner()) = io;
        let events = Arc::clone(&self.events);
        let (cid, eid) = (id.to_string(), exec_id.to_string());
        process.watch(pid, move |pid, exit| {
            events.publish(exit_event(&cid, &eid, pid, exit))
        });
        self.events.publish(TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(pid as u32)
    }

    fn start_exec(
        &self,
        id: &str,
        exec_id: &str,
        bundle: &Path,
        spec: &Path,
        paths: &Paths,
    ) -> Result<(i32, stdio::Io), TaskError> {
        let mut opts = ExecOptions {
            process: Some(spec.to_path_buf()),
            detach: true,
            tty: paths.terminal,
            ..Default::default()
        };
        if paths.terminal {
            let socket = ConsoleSocket::bind(bundle, &format!("exec-{exec_id}"))?;
            opts.console_socket = Some(socket.path().to_path_buf());
            let pid = lifecycle::exec(&self.store, id, &opts, None)?;
            let io = socket
                .receive()
                .and_then(|master| tty::relay(master, paths));
            match io {
                Ok(io) => Ok((pid, io)),
                Err(e) => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    Err(e.into())
                }
            }
        } else {
            let (stdio, io) = stdio::open(paths)?;
            opts.stdio = stdio;
            let pid = lifecycle::exec(&self.store, id, &opts, None)?;
            Ok((pid, io))
        }
    }

    /// Adds a process to the container; it runs on `start`.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec: Vec<u8>,
        paths: Paths,
    ) -> Result<(), TaskError> {
        let c = self.get(id)?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            TaskError::BadSpec {
                id: format!("{id}/{exec_id}"),
                what: "OCI process spec",
                message: e.to_string(),
            }
        })?;
        {
            let mut execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            if exec_id.is_empty() || execs.contains_key(exec_id) {
                return Err(TaskError::ExecExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            execs.insert(
                exec_id.to_string(),
                Exec {
                    process: Process::new(Default::default()),
                    paths,
                    spec,
                },
            );
        }
        self.events.publish(TaskExecAdded {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        });
        Ok(())
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState, TaskError> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let (process, paths) = {
                let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
                let exec = execs.get(exec_id).ok_or_else(|| TaskError::ExecNotFound {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                })?;
                (Arc::clone(&exec.process), exec.paths.clone())
            };
            let exit = process.exit();
            let status = match (process.pid(), exit) {
                (_, Some(_)) => Status::Stopped,
                (None, None) => Status::Created,
                (Some(_), None) => Status::Running,
            };
            return Ok(ProcessState {
                pid: process.pid().unwrap_or(0) as u32,
                status,
                exit,
                bundle: c.bundle.clone(),
                paths,
            });
        }
        let exit = c.init.exit();
        let status = match exit {
            Some(_) => Status::Stopped,
            None => lifecycle::state(&self.store, id)?.status,
        };
        Ok(ProcessState {
            pid: c.init.pid().unwrap_or(0) as u32,
            status,
            exit,
            bundle: c.bundle.clone(),
            paths: c.paths.clone(),
        })
    }

    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let process = self.process(id, exec_id)?;
        if process.exit().is_some() {
            return Err(TaskError::Finished(
                if exec_id.is_empty() { id } else { exec_id }.to_string(),
            ));
        }
        if exec_id.is_empty() {
            return Ok(lifecycle::kill(&self.store, id, signal as i32, all)?);
        }
        let Some(pid) = process.pid() else {
            return Err(TaskError::Finished(exec_id.to_string()));
        };
        let sig =
            nix::sys::signal::Signal::try_from(signal as i32).map_err(|e| TaskError::BadSpec {
                id: id.to_string(),
                what: "signal number",
                message: e.to_string(),
            })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|_| TaskError::Finished(exec_id.to_string()))
    }

    /// Deletes an exec process, or the container and everything it left. Returns the
    /// process's pid and exit.
    pub fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), TaskError> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let mut execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            let exec = execs.get(exec_id).ok_or_else(|| TaskError::ExecNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
            if exec.process.pid().is_some() && exec.process.exit().is_none() {
                return Err(TaskError::Running(format!("{id}/{exec_id}")));
            }
            let exec = execs.remove(exec_id).expect("checked above");
            let exit = exec.process.exit().unwrap_or(Exit {
                code: 0,
                at: SystemTime::now(),
            });
            return Ok((exec.process.pid().unwrap_or(0) as u32, exit));
        }
        let running =
            matches!(lifecycle::state(&self.store, id), Ok(s) if s.status == Status::Running);
        if c.init.exit().is_none() && running {
            return Err(TaskError::Running(id.to_string()));
        }
        match lifecycle::delete(&self.store, id, true) {
            Ok(()) | Err(LifecycleError::Store(StoreError::NotFound(_))) => {}
            Err(e) => return Err(e.into()),
        }
        // A container deleted before it ran was killed by the delete.
        c.init.set_exited(KILLED);
        let exit = c.init.wait();
        c.init.io.lock().unwrap_or_else(|e| e.into_inner()).close();
        if c.rootfs_mounted {
            rootfs::unmount(&c.bundle);
        }
        self.map().remove(id);
        let pid = c.init.pid().unwrap_or(0) as u32;
        self.events.publish(TaskDelete {
            container_id: id.to_string(),
            pid,
            exit_status: exit.code,
            exited_at: Some(exit.at.into()).into(),
            ..Default::default()
        });
        Ok((pid, exit))
    }

    pub fn pids(&self, id: &str) -> Result<Vec<i32>, TaskError> {
        self.get(id)?;
        Ok(lifecycle::pids(&self.store, id)?)
    }

    pub fn pause(&self, id: &str) -> Result<(), TaskError> {
        self.get(id)?;
        lifecycle::pause(&self.store, id)?;
        self.events.publish(TaskPaused {
            container_id: id.to_string(),
            ..Default::default()
        });
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), TaskError> {
        self.get(id)?;
        lifecycle::resume(&self.store, id)?;
        self.events.publish(TaskResumed {
            container_id: id.to_string(),
            ..Default::default()
        });
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<serde_json::Value, TaskError> {
        self.get(id)?;
        Ok(lifecycle::stats(&self.store, id)?)
    }

    pub fn update(&self, id: &str, resources: &[u8]) -> Result<(), TaskError> {
        self.get(id)?;
        let resources: LinuxResources =
            serde_json::from_slice(resources).map_err(|e| TaskError::BadSpec {
                id: id.to_string(),
                what: "OCI LinuxResources",
                message: e.to_string(),
            })?;
        Ok(lifecycle::update(&self.store, id, &resources)?)
    }

    /// Removes the namespace's state directory once the last container is gone.
    pub fn cleanup(&self) {
        if self.is_empty() {
            // Fails harmlessly while other shims of the namespace still have containers.
            let _ = std::fs::remove_dir(self.store.root());
        }
    }

    /// The `delete` action: containerd lost the shim; remove whatever the container left.
    pub fn force_delete(&self, id: &str, bundle: &Path) {
        match lifecycle::delete(&self.store, id, true) {
            Ok(()) | Err(LifecycleError::Store(StoreError::NotFound(_))) => {}
            Err(e) => log::warn!("deleting {id}: {e}"),
        }
        rootfs::unmount(bundle);
        self.cleanup();
    }
}

fn exit_event(container_id: &str, id: &str, pid: i32, exit: Exit) -> TaskExit {
    TaskExit {
        container_id: container_id.to_string(),
        id: id.to_string(),
        pid: pid as u32,
        exit_status: exit.code,
        exited_at: Some(exit.at.into()).into(),
        ..Default::default()
    }
}

/// Whether an error means "no such thing" (containerd treats those specially).
pub fn is_not_found(e: &TaskError) -> bool {
    matches!(
        e,
        TaskError::NotFound(_)
            | TaskError::ExecNotFound { .. }
            | TaskError::Finished(_)
            | TaskError::Lifecycle(LifecycleError::Store(StoreError::NotFound(_)))
            | TaskError::Lifecycle(LifecycleError::Sandbox(SandboxError::WrongStatus {
                status: Status::Stopped,
                ..
            }))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_isolation_comes_from_the_environment_and_bad_values_are_errors() {
        assert_eq!(parse_isolation(None).unwrap(), None);
        assert_eq!(parse_isolation(Some(String::new())).unwrap(), None);
        assert_eq!(
            parse_isolation(Some("container".into())).unwrap(),
            Some(Isolation::Container)
        );
        assert_eq!(
            parse_isolation(Some("vm".into())).unwrap(),
            Some(Isolation::Vm)
        );
        let err = parse_isolation(Some("kvm".into())).unwrap_err().to_string();
        assert!(
            err.contains("HUSK_ISOLATION=\"kvm\"") && err.contains("use vm or container"),
            "{err}"
        );
    }
}
