//! `--isolation container`: the container runs on the host kernel, set up by libcontainer
//! (youki's library) with namespaces, cgroupfs cgroups (v1 or v2, never systemd), the
//! bundle's seccomp profile, masked and read-only paths.
//!
//! The pid is the container init's. `create` returns with init waiting on libcontainer's
//! notify socket (the exec barrier); init's parent has exited, so it is reparented to the
//! caller's subreaper, as with runc. libcontainer keeps its state in
//! `<entry>/container/<id>/`.

use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::LinuxResources;

use super::{CreateOptions, ExecOptions, Sandbox, SandboxError, Stdio};
use crate::oci::{Bundle, Entry, Status};

/// Where, inside the store entry, libcontainer keeps its root.
const LIBCONTAINER_ROOT: &str = "container";

/// The libcontainer backend. Stateless: everything lives in the store entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContainerSandbox;

fn root(entry: &Entry) -> PathBuf {
    entry.dir().join(LIBCONTAINER_ROOT)
}

fn state_dir(entry: &Entry) -> PathBuf {
    root(entry).join(entry.id())
}

/// An error and its sources, one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

fn status_of(s: ContainerStatus) -> Status {
    match s {
        ContainerStatus::Creating => Status::Creating,
        ContainerStatus::Created => Status::Created,
        ContainerStatus::Running => Status::Running,
        ContainerStatus::Stopped => Status::Stopped,
        ContainerStatus::Paused => Status::Paused,
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

fn map_err<'a>(
    id: &'a str,
    op: &'static str,
) -> impl FnOnce(LibcontainerError) -> SandboxError + 'a {
    move |err| match err {
        LibcontainerError::IncorrectStatus(s) => SandboxError::WrongStatus {
            id: id.to_string(),
            status: status_of(s),
            op,
            hint: hint(op),
        },
        other => SandboxError::Backend {
            id: id.to_string(),
            op,
            message: chain(&other),
        },
    }
}

/// Runs `op` a second time when it failed because a process vanished between two reads
/// of its /proc directory. libcontainer opens /proc/PID and then reads /proc/PID/stat to
/// find a container's status; an init reaped in between (just SIGKILLed, say) fails the
/// second read, and the next attempt finds no /proc/PID and sees the container stopped.
fn again_if_process_vanished<T>(
    mut op: impl FnMut() -> Result<T, LibcontainerError>,
) -> Result<T, LibcontainerError> {
    match op() {
        Err(LibcontainerError::Procfs(procfs::ProcError::NotFound(_))) => op(),
        other => other,
    }
}

fn io_err<'a>(id: &'a str, op: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError + 'a {
    move |err| SandboxError::Backend {
        id: id.to_string(),
        op,
        message: err.to_string(),
    }
}

impl ContainerSandbox {
    fn load(&self, entry: &Entry, op: &'static str) -> Result<Container, SandboxError> {
        let dir = state_dir(entry);
        again_if_process_vanished(|| Container::load(dir.clone())).map_err(map_err(entry.id(), op))
    }

    fn cgroup(&self, entry: &Entry, op: &'static str) -> Result<AnyCgroupManager, SandboxError> {
        let container = self.load(entry, op)?;
        let config = container.spec().map_err(map_err(entry.id(), op))?;
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: config.cgroup_path,
            systemd_cgroup: false,
            container_name: entry.id().to_string(),
        })
        .map_err(|e| SandboxError::Backend {
            id: entry.id().to_string(),
            op,
            message: chain(&e),
        })
    }

    fn builder(
        &self,
        entry: &Entry,
        console_socket: Option<&PathBuf>,
        preserve_fds: i32,
        stdio: &Stdio,
        op: &'static str,
    ) -> Result<ContainerBuilder, SandboxError> {
        // The workload starts with default signal dispositions, not husk's (see
        // husk_workload).
        let mut builder = ContainerBuilder::new(entry.id().to_string(), SyscallType::default())
            .with_executor(husk_workload::CleanSignalsExecutor)
            .with_root_path(root(entry))
            .map_err(map_err(entry.id(), op))?
            .with_console_socket(console_socket)
            .with_preserved_fds(preserve_fds);
        // libcontainer closes the fds it is given: hand it duplicates, the caller keeps its own.
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(io_err(entry.id(), op));
        if let Some(fd) = &stdio.stdin {
            builder = builder.with_stdin(dup(fd)?);
        }
        if let Some(fd) = &stdio.stdout {
            builder = builder.with_stdout(dup(fd)?);
        }
        if let Some(fd) = &stdio.stderr {
            builder = builder.with_stderr(dup(fd)?);
        }
        builder.validate_id().map_err(map_err(entry.id(), op))
    }
}

impl Sandbox for ContainerSandbox {
    fn create(
        &self,
        entry: &Entry,
        bundle: &Bundle,
        opts: &CreateOptions,
    ) -> Result<i32, SandboxError> {
        let id = entry.id();
        fs::create_dir_all(root(entry)).map_err(io_err(id, "create"))?;
        // libcontainer never joins a new session keyring, which is what
        // --no-new-keyring asks for; without the flag runc would make one.
        let _ = opts.no_new_keyring;
        let container = self
            .builder(
                entry,
                opts.console_socket.as_ref(),
                opts.preserve_fds,
                &opts.stdio,
                "create",
            )?
            .as_init(&bundle.path)
            .with_systemd(false)
            .with_detach(!opts.foreground)
            .with_no_pivot(opts.no_pivot)
            .build()
            .map_err(map_err(id, "create"))?;
        container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| SandboxError::Backend {
                id: id.to_string(),
                op: "create",
                message: "libcontainer reported no pid for the container init".into(),
            })
    }

    fn start(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.load(entry, "start")?
            .start()
            .map_err(map_err(entry.id(), "start"))
    }

    fn status(&self, entry: &Entry) -> Result<(Status, Option<i32>), SandboxError> {
        if !state_dir(entry).join("state.json").exists() {
            // Create failed or was interrupted before libcontainer wrote its state.
            return Ok((Status::Stopped, None));
        }
        let c = self.load(entry, "state")?;
        Ok((status_of(c.status()), c.pid().map(|p| p.as_raw())))
    }

    fn kill(&self, entry: &Entry, signal: i32, all: bool) -> Result<(), SandboxError> {
        let id = entry.id();
        let sig =
            nix::sys::signal::Signal::try_from(signal).map_err(|_| SandboxError::Backend {
                id: id.to_string(),
                op: "kill",
                message: format!("{signal} is not a signal number"),
            })?;
        let before = self.load(entry, "kill")?.status();
        // Each attempt loads the container anew, so a retry sees its status after the race.
        again_if_process_vanished(|| Container::load(state_dir(entry))?.kill(sig, all))
            .map_err(map_err(id, "kill"))?;
        // libcontainer marks the container stopped after any signal; a created or paused
        // container that survived it (SIGUSR1, say) keeps its status.
        let mut after = self.load(entry, "kill")?;
        if matches!(before, ContainerStatus::Created | ContainerStatus::Paused)
            && after.status() != ContainerStatus::Stopped
        {
            after
                .set_status(before)
                .save()
                .map_err(map_err(id, "kill"))?;
        }
        Ok(())
    }

    fn delete(&self, entry: &Entry, force: bool) -> Result<(), SandboxError> {
        if !state_dir(entry).join("state.json").exists() {
            return Ok(());
        }
        self.load(entry, "delete")?
            .delete(force)
            .map_err(map_err(entry.id(), "delete"))
    }

    fn exec(&self, entry: &Entry, opts: &ExecOptions) -> Result<i32, SandboxError> {
        let id = entry.id();
        let env: HashMap<String, String> = opts
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect();
        let mut tenant = self
            .builder(
                entry,
                opts.console_socket.as_ref(),
                opts.preserve_fds,
                &opts.stdio,
                "exec",
            )?
            .as_tenant()
            .with_detach(opts.detach)
            .with_env(env)
            .with_cwd(opts.cwd.as_ref())
            .with_process(opts.process.as_ref())
            .with_container_args(opts.args.clone())
            .with_user(opts.uid)
            .with_group(opts.gid)
            .with_additional_gids(opts.additional_gids.clone())
            .with_no_new_privs(opts.no_new_privs);
        if !opts.capabilities.is_empty() {
            tenant = tenant.with_capabilities(opts.capabilities.clone());
        }
        tenant
            .build()
            .map(|p| p.as_raw())
            .map_err(map_err(id, "exec"))
    }

    fn pids(&self, entry: &Entry) -> Result<Vec<i32>, SandboxError> {
        let mgr = self.cgroup(entry, "ps")?;
        let pids = mgr.get_all_pids().map_err(|e| SandboxError::Backend {
            id: entry.id().to_string(),
            op: "ps",
            message: chain(&e),
        })?;
        let mut pids: Vec<i32> = pids.into_iter().map(|p| p.as_raw()).collect();
        pids.sort_unstable();
        Ok(pids)
    }

    fn pause(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.load(entry, "pause")?
            .pause()
            .map_err(map_err(entry.id(), "pause"))
    }

    fn resume(&self, entry: &Entry) -> Result<(), SandboxError> {
        self.load(entry, "resume")?
            .resume()
            .map_err(map_err(entry.id(), "resume"))
    }

    fn stats(&self, entry: &Entry) -> Result<serde_json::Value, SandboxError> {
        let stats = self
            .cgroup(entry, "events")?
            .stats()
            .map_err(|e| SandboxError::Backend {
                id: entry.id().to_string(),
                op: "events",
                message: chain(&e),
            })?;
        serde_json::to_value(stats).map_err(|e| SandboxError::Backend {
            id: entry.id().to_string(),
            op: "events",
            message: e.to_string(),
        })
    }

    fn runs_host_hooks(&self) -> bool {
        false
    }

    fn update(&self, entry: &Entry, resources: &LinuxResources) -> Result<(), SandboxError> {
        let opt = ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.cgroup(entry, "update")?
            .apply(&opt)
            .map_err(|e| SandboxError::Backend {
                id: entry.id().to_string(),
                op: "update",
                message: chain(&e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_status_names_the_fix() {
        let e =
            map_err("c1", "delete")(LibcontainerError::IncorrectStatus(ContainerStatus::Running));
        let msg = e.to_string();
        assert!(
            msg.contains("c1 is running") && msg.contains("--force"),
            "{msg}"
        );
        let e = map_err("c1", "start")(LibcontainerError::Exist);
        assert!(e.to_string().contains("start failed"), "{e}");
    }

    #[test]
    fn a_process_that_vanished_mid_read_is_read_again_once() {
        let vanished = || LibcontainerError::Procfs(procfs::ProcError::NotFound(None));
        let mut calls = 0;
        let r = again_if_process_vanished(|| {
            calls += 1;
            if calls == 1 {
                Err(vanished())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 2);
        // Vanished twice: the second error is the answer, no third read.
        let mut calls = 0;
        let r: Result<(), _> = again_if_process_vanished(|| {
            calls += 1;
            Err(vanished())
        });
        assert!(r.is_err() && calls == 2);
        // Any other error is not retried.
        let mut calls = 0;
        let r: Result<(), _> = again_if_process_vanished(|| {
            calls += 1;
            Err(LibcontainerError::Exist)
        });
        assert!(matches!(r, Err(LibcontainerError::Exist)) && calls == 1);
    }
}
