//! The runc-compatible lifecycle over the state store and a [`Sandbox`] backend. The CLI
//! calls these; each takes the container's lock for the duration of the operation.

use std::path::{Path, PathBuf};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::hooks::{self, HookError, Stage};
use super::pod::Role;
use super::{backend_of, CreateOptions, ExecOptions, Sandbox, SandboxError};
use crate::oci::bundle::BundleError;
use crate::oci::state::OCI_VERSION;
use crate::oci::store::write_atomic;
use crate::oci::{
    Bundle, Entry, Isolation, IsolationError, OciState, Record, Status, Store, StoreError,
};

/// Errors of lifecycle operations.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum LifecycleError {
    /// {0}
    Bundle(#[from] BundleError),
    /// {0}
    Isolation(#[from] IsolationError),
    /// {0}
    Store(#[from] StoreError),
    /// {0}
    Sandbox(#[from] SandboxError),
    /// container {id}: {source}
    Hook { id: String, source: HookError },
    /// cannot wait for pid {pid}: {source}
    Wait { pid: i32, source: nix::Error },
    /// cannot become a child subreaper: {0}
    Subreaper(nix::Error),
    /// container {id} belongs to the pod whose sandbox container is {sandbox_id} (annotation io.kubernetes.cri.sandbox-id), which does not exist under this root: create the sandbox container first
    NoPodSandbox { id: String, sandbox_id: String },
}

fn open(store: &Store, id: &str) -> Result<(Entry, Record, Box<dyn Sandbox>), LifecycleError> {
    let entry = store.lock(id)?;
    let record = entry.read()?;
    let sandbox = backend_of(
        store.root(),
        record.isolation,
        record.pod_sandbox.as_deref(),
    )?;
    Ok((entry, record, sandbox))
}

/// The pod sandbox a new container `id` runs in: with the CRI annotations of a pod
/// member, the pod's sandbox container when that runs in a VM (the member joins it
/// there). A member of a pod of plain containers is a container of its own that joins
/// the sandbox's namespaces by their host paths, as with runc.
fn pod_sandbox_of(
    store: &Store,
    id: &str,
    isolation: Isolation,
    bundle: &Bundle,
) -> Result<Option<String>, LifecycleError> {
    let annotations = bundle.spec.annotations().clone().unwrap_or_default();
    let Role::Member { sandbox_id } = Role::of(id, &annotations) else {
        return Ok(None);
    };
    if isolation != Isolation::Vm {
        return Ok(None);
    }
    let sandbox = match store.lock(&sandbox_id) {
        Ok(entry) => entry.read()?,
        Err(StoreError::NotFound(_)) => {
            return Err(LifecycleError::NoPodSandbox {
                id: id.to_string(),
                sandbox_id,
            })
        }
        Err(e) => return Err(e.into()),
    };
    Ok((sandbox.isolation == Isolation::Vm && sandbox.pod_sandbox.is_none()).then_some(sandbox_id))
}

/// Creates container `id` from the bundle at `bundle_dir`; writes `pid_file` when given.
/// On any failure nothing is left behind: no state directory, no process, no cgroup.
pub fn create(
    store: &Store,
    id: &str,
    bundle_dir: &Path,
    isolation: Option<Isolation>,
    opts: &CreateOptions,
    pid_file: Option<&Path>,
) -> Result<i32, LifecycleError> {
    let bundle = Bundle::load(bundle_dir)?;
    let isolation = Isolation::choose(isolation, bundle.spec.annotations().as_ref())?;
    let pod_sandbox = pod_sandbox_of(store, id, isolation, &bundle)?;
    let sandbox = backend_of(store.root(), isolation, pod_sandbox.as_deref())?;
    let entry = store.reserve(id)?;
    let mut record = Record {
        id: id.to_string(),
        isolation,
        bundle: bundle.path.clone(),
        rootfs: bundle.rootfs(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        pid: None,
        pod_sandbox,
    };
    let created = (|| -> Result<i32, LifecycleError> {
        entry.write(&record)?;
        let pid = sandbox.create(&entry, &bundle, opts)?;
        record.pid = Some(pid);
        entry.write(&record)?;
        if sandbox.runs_host_hooks() {
            hooks::run_for(
                &entry,
                Some(&bundle.spec),
                Stage::Created,
                Status::Created,
                pid,
            )
            .map_err(|source| hook_err(id, source))?;
        }
        if let Some(path) = pid_file {
            write_atomic(&absolute(path), pid.to_string().as_bytes())?;
        }
        Ok(pid)
    })();
    match created {
        Ok(pid) => Ok(pid),
        Err(e) => {
            let _ = sandbox.delete(&entry, true);
            let _ = entry.remove();
            Err(e)
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Releases the container's process from the exec barrier.
pub fn start(store: &Store, id: &str) -> Result<(), LifecycleError> {
    let (entry, record, sandbox) = open(store, id)?;
    sandbox.start(&entry)?;
    if sandbox.runs_host_hooks() {
        // The container's pid as create reported it, even if it has exited by now.
        let pid = record.pid.unwrap_or(0);
        hooks::run_for(&entry, None, Stage::Started, Status::Running, pid)
            .map_err(|source| hook_err(id, source))?;
    }
    Ok(())
}

fn hook_err(id: &str, source: HookError) -> LifecycleError {
    LifecycleError::Hook {
        id: id.to_string(),
        source,
    }
}

/// The OCI state of a container.
pub fn state(store: &Store, id: &str) -> Result<OciState, LifecycleError> {
    let (entry, record, sandbox) = open(store, id)?;
    let (status, pid) = match record.pid {
        None => (Status::Creating, None),
        Some(_) => sandbox.status(&entry)?,
    };
    Ok(OciState {
        oci_version: OCI_VERSION.to_string(),
        id: record.id,
        status,
        pid: if status == Status::Stopped {
            0
        } else {
            pid.or(record.pid).unwrap_or(0)
        },
        bundle: record.bundle,
        rootfs: record.rootfs,
        created: record.created,
        owner: String::new(),
        annotations: record.annotations,
    })
}

/// The states of all containers under the root; those that vanish meanwhile are skipped.
pub fn list(store: &Store) -> Result<Vec<OciState>, LifecycleError> {
    let mut states = Vec::new();
    for id in store.list()? {
        match state(store, &id) {
            Ok(s) => states.push(s),
            Err(LifecycleError::Store(StoreError::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(states)
}

/// Sends a signal to the container's process (or, with `all`, to all its processes).
pub fn kill(store: &Store, id: &str, signal: i32, all: bool) -> Result<(), LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    sandbox.kill(&entry, signal, all)?;
    Ok(())
}

/// Deletes the container and everything it left: processes (`force`), cgroups, state.
pub fn delete(store: &Store, id: &str, force: bool) -> Result<(), LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    sandbox.delete(&entry, force)?;
    // poststop hooks read the record, so they run before it goes (a failing one is
    // logged, not an error: hooks::run).
    if sandbox.runs_host_hooks() {
        hooks::run_for(&entry, None, Stage::Deleted, Status::Stopped, 0)
            .map_err(|source| hook_err(id, source))?;
    }
    entry.remove()?;
    Ok(())
}

/// Starts a process in the running container; writes `pid_file` when given.
pub fn exec(
    store: &Store,
    id: &str,
    opts: &ExecOptions,
    pid_file: Option<&Path>,
) -> Result<i32, LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    let pid = sandbox.exec(&entry, opts)?;
    if let Some(path) = pid_file {
        write_atomic(&absolute(path), pid.to_string().as_bytes())?;
    }
    Ok(pid)
}

/// The host pids of the container's processes.
pub fn pids(store: &Store, id: &str) -> Result<Vec<i32>, LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    Ok(sandbox.pids(&entry)?)
}

pub fn pause(store: &Store, id: &str) -> Result<(), LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    Ok(sandbox.pause(&entry)?)
}

pub fn resume(store: &Store, id: &str) -> Result<(), LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    Ok(sandbox.resume(&entry)?)
}

pub fn stats(store: &Store, id: &str) -> Result<serde_json::Value, LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    Ok(sandbox.stats(&entry)?)
}

pub fn update(store: &Store, id: &str, resources: &LinuxResources) -> Result<(), LifecycleError> {
    let (entry, _, sandbox) = open(store, id)?;
    Ok(sandbox.update(&entry, resources)?)
}

/// Makes this process the reaper of its orphaned descendants, so that a container
/// process whose parent exits (as libcontainer's intermediate does) can be waited for.
pub fn become_subreaper() -> Result<(), LifecycleError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(LifecycleError::Subreaper)
}

/// Waits for `pid` (a child, or an orphan reparented to us as subreaper) and returns its
/// exit code the way a shell reports it: the status, or 128 + the signal.
pub fn wait_exit_code(pid: i32) -> Result<i32, LifecycleError> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(source) => return Err(LifecycleError::Wait { pid, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bundle_or_vm_leaves_no_state() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("root")).unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"ociVersion":"1.0.2","process":7}"#,
        )
        .unwrap();
        let err = create(
            &store,
            "c",
            &bundle,
            Some(Isolation::Container),
            &Default::default(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`process`"), "{err}");
        std::fs::write(
            bundle.join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        // Refused before any daemon starts: host fds cannot cross into a guest.
        let opts = CreateOptions {
            preserve_fds: 1,
            ..Default::default()
        };
        let err = create(&store, "c", &bundle, Some(Isolation::Vm), &opts, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--preserve-fds is not supported"), "{err}");
        assert!(store.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(store.root()).unwrap().count(), 0);
        let err = state(&store, "c").unwrap_err().to_string();
        assert!(err.contains("\"c\" does not exist"), "{err}");
    }

    #[test]
    fn a_vm_pod_member_needs_its_sandbox_and_a_container_pod_member_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("root")).unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}},
               "annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod9"}}"#,
        )
        .unwrap();
        let b = Bundle::load(&bundle).unwrap();
        let err = pod_sandbox_of(&store, "app", Isolation::Vm, &b).unwrap_err();
        assert!(
            matches!(&err, LifecycleError::NoPodSandbox { sandbox_id, .. } if sandbox_id == "pod9"),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("create the sandbox container first"));
        let err = create(
            &store,
            "app",
            &bundle,
            Some(Isolation::Vm),
            &Default::default(),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, LifecycleError::NoPodSandbox { .. }), "{err}");
        assert!(store.list().unwrap().is_empty(), "nothing made");
        // Plain containers join the pod's namespaces by host path, as with runc.
        assert_eq!(
            pod_sandbox_of(&store, "app", Isolation::Container, &b).unwrap(),
            None
        );
        // The sandbox's record decides: a VM sandbox takes its members in.
        for (isolation, want) in [
            (Isolation::Vm, Some("pod9".to_string())),
            (Isolation::Container, None),
        ] {
            let entry = store.reserve("pod9").unwrap();
            entry
                .write(&Record {
                    id: "pod9".into(),
                    isolation,
                    bundle: bundle.clone(),
                    rootfs: bundle.join("rootfs"),
                    created: String::new(),
                    annotations: Default::default(),
                    pid: Some(1),
                    pod_sandbox: None,
                })
                .unwrap();
            drop(entry);
            assert_eq!(
                pod_sandbox_of(&store, "app", Isolation::Vm, &b).unwrap(),
                want
            );
            store.lock("pod9").unwrap().remove().unwrap();
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        for (script, want) in [("exit 7", 7), ("kill -TERM $$", 128 + 15)] {
            // Reaped by wait_exit_code, not by std.
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            assert_eq!(wait_exit_code(child.id() as i32).unwrap(), want, "{script}");
        }
    }
}
