//! Sandboxes: where a container actually runs. The [`Sandbox`] trait is the seam between
//! the lifecycle (state store, pid file, the runc-compatible commands, in
//! [`lifecycle`]) and a backend:
//!
//! - [`container::ContainerSandbox`]: `--isolation container`, libcontainer on the host.
//! - [`vm::VmSandbox`]: `--isolation vm`, one microVM per container run by the
//!   `husk vmm` daemon ([`crate::daemon`]) with the guest agent.
//! - [`member::MemberSandbox`]: a container of a pod ([`pod`]) whose sandbox container
//!   runs in a VM: it runs in that VM.
//!
//! Every method gets the container's locked store [`Entry`]: backends keep their own
//! files in `entry.dir()`.

pub mod container;
pub mod hooks;
pub mod husk_binary;
pub mod lifecycle;
pub mod member;
pub mod pod;
pub mod signal;
pub mod vm;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use oci_spec::runtime::LinuxResources;

use crate::oci::{Bundle, Entry, Isolation, Status};

/// Options of `create` that a backend honours.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Unix socket to send the pty master to (`process.terminal: true`).
    pub console_socket: Option<PathBuf>,
    /// Use MS_MOVE instead of pivot_root (for a rootfs on ramfs).
    pub no_pivot: bool,
    /// Do not create a new session keyring.
    pub no_new_keyring: bool,
    /// Extra fds, from 3 on, passed to the container process.
    pub preserve_fds: i32,
    /// `husk run` without --detach: the container's stdio is husk's own, which waits.
    pub foreground: bool,
    /// The container process's stdio (the shim's FIFOs); unset ones are the caller's own.
    pub stdio: Stdio,
    /// Guest kernel and initramfs for `--isolation vm` (`--kernel`/`--initrd`); unset ones
    /// are found by `artifacts::locate` (environment, build output, system install).
    pub guest_artifacts: GuestArtifacts,
    /// The vmm daemon's seccomp mode (`--seccomp`; `log`/`off` in debug builds only).
    pub seccomp: crate::seccomp::SeccompMode,
    /// `--isolation vm`: boot the guest cold instead of restoring it from the template of
    /// its configuration (`--no-template`).
    pub no_template: bool,
}

/// Explicit guest kernel and initramfs paths.
#[derive(Debug, Clone, Default)]
pub struct GuestArtifacts {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// Files to use as a process's stdin, stdout and stderr instead of the caller's
/// (the containerd shim hands over the FIFOs containerd made). Shared, because a
/// backend dups them into the process it starts.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: Option<Arc<OwnedFd>>,
    pub stdout: Option<Arc<OwnedFd>>,
    pub stderr: Option<Arc<OwnedFd>>,
}

/// A process to start in a running container (`husk exec`).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// A process.json in the OCI `process` format; when set, `args` must be empty.
    pub process: Option<PathBuf>,
    pub args: Vec<String>,
    /// `KEY=VALUE`, added to the container's environment.
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub console_socket: Option<PathBuf>,
    pub detach: bool,
    pub preserve_fds: i32,
    pub no_new_privs: bool,
    pub capabilities: Vec<String>,
    /// The process's stdio; unset ones are the caller's own.
    pub stdio: Stdio,
}

/// Errors of sandbox backends.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SandboxError {
    /// container {id}: {op} failed: {message}
    Backend {
        id: String,
        op: &'static str,
        message: String,
    },
    /// container {id} is {status}: cannot {op} it{hint}
    WrongStatus {
        id: String,
        status: Status,
        op: &'static str,
        hint: &'static str,
    },
    /// {0}
    Unsupported(String),
}

/// The operations a backend provides for one container.
pub trait Sandbox {
    /// Creates the container and leaves its process waiting at the exec barrier.
    /// Returns the pid that represents the container to callers (`--pid-file`).
    fn create(
        &self,
        entry: &Entry,
        bundle: &Bundle,
        opts: &CreateOptions,
    ) -> Result<i32, SandboxError>;
    /// Releases the exec barrier: the user process runs.
    fn start(&self, entry: &Entry) -> Result<(), SandboxError>;
    /// The current status and pid (a dead process reads as `stopped`).
    fn status(&self, entry: &Entry) -> Result<(Status, Option<i32>), SandboxError>;
    /// Sends `signal` to the container process, or to all its processes.
    fn kill(&self, entry: &Entry, signal: i32, all: bool) -> Result<(), SandboxError>;
    /// Removes everything the backend made: processes (with `force`), cgroups, files.
    fn delete(&self, entry: &Entry, force: bool) -> Result<(), SandboxError>;
    /// Starts another process in the running container; returns its pid.
    fn exec(&self, entry: &Entry, opts: &ExecOptions) -> Result<i32, SandboxError>;
    /// The host pids of all processes of the container.
    fn pids(&self, entry: &Entry) -> Result<Vec<i32>, SandboxError>;
    /// Freezes all processes of the container.
    fn pause(&self, entry: &Entry) -> Result<(), SandboxError>;
    /// Thaws them.
    fn resume(&self, entry: &Entry) -> Result<(), SandboxError>;
    /// Resource usage, as JSON (`husk events --stats`).
    fn stats(&self, entry: &Entry) -> Result<serde_json::Value, SandboxError>;
    /// Changes the container's resource limits.
    fn update(&self, entry: &Entry, resources: &LinuxResources) -> Result<(), SandboxError>;
    /// Whether the lifecycle runs the container's runtime-namespace OCI hooks on the host
    /// ([`hooks`]): true where the container runs in a guest, which lacks the host
    /// programs they name; a plain container's hooks are libcontainer's to run.
    fn runs_host_hooks(&self) -> bool;
}

/// The backend for an isolation level.
pub fn backend(isolation: Isolation) -> Result<Box<dyn Sandbox>, SandboxError> {
    match isolation {
        Isolation::Container => Ok(Box::new(container::ContainerSandbox)),
        Isolation::Vm => Ok(Box::new(vm::VmSandbox)),
    }
}

/// The backend of a container in the store: a VM pod's member runs in its sandbox.
pub fn backend_of(
    store_root: &std::path::Path,
    isolation: Isolation,
    pod_sandbox: Option<&str>,
) -> Result<Box<dyn Sandbox>, SandboxError> {
    match pod_sandbox {
        Some(sandbox_id) => Ok(Box::new(member::MemberSandbox {
            sandbox_id: sandbox_id.to_string(),
            sandbox_dir: store_root.join(sandbox_id),
        })),
        None => backend(isolation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_isolation_levels_have_a_backend() {
        assert!(backend(Isolation::Vm).is_ok());
        assert!(backend(Isolation::Container).is_ok());
    }
}
