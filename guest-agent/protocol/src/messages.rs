//! Requests the host sends on the control port and the agent's responses.
//!
//! One request, then one response, per control connection at a time. The host gets
//! concurrency by opening more control connections (each starts with `Hello`): a
//! `WaitProcess` blocks only its own connection.

use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// Version of the messages in this module. Bump it on any incompatible change: the
/// `Hello` exchange then fails with [`AgentError::VersionMismatch`] on both sides instead of
/// a confusing decode error later.
pub const PROTOCOL_VERSION: u32 = 1;

/// Which standard streams the host wants for a new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StdioRequest {
    /// Give the process a stdin stream; without it the process reads `/dev/null`.
    pub stdin: bool,
}

/// The ports the agent listens on for one process's streams; the host connects to each
/// once. With a terminal (`process.terminal`), `pty` carries both directions and the
/// others are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StdioPorts {
    pub stdin: Option<u32>,
    pub stdout: Option<u32>,
    pub stderr: Option<u32>,
    pub pty: Option<u32>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal with this number killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
        }
    }
}

/// Names one process: a container's init (`exec_id: None`) or one of its execs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub container_id: String,
    pub exec_id: Option<String>,
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Must be the first message on every control connection.
    Hello {
        version: u32,
    },
    Ping,
    /// Creates a container and holds it at the exec barrier until `StartContainer`.
    /// `rootfs` is the root filesystem as the agent sees it; it overrides `spec.root.path`.
    CreateContainer {
        id: String,
        spec: Box<Spec>,
        rootfs: PathBuf,
        stdio: StdioRequest,
    },
    StartContainer {
        id: String,
    },
    /// Runs another process in a running container.
    ExecProcess {
        container_id: String,
        exec_id: String,
        process: Box<Process>,
        stdio: StdioRequest,
    },
    SignalProcess {
        process: ProcessRef,
        signal: i32,
    },
    /// Blocks until the process has exited.
    WaitProcess {
        process: ProcessRef,
    },
    ResizePty {
        process: ProcessRef,
        rows: u16,
        cols: u16,
    },
    Stats {
        container_id: String,
    },
    /// Removes a container's state and cgroup; `force` kills it first if it still runs.
    DeleteContainer {
        id: String,
        force: bool,
    },
    /// Kills every container and powers the VM off (on the host: the agent exits).
    Shutdown,
}

/// The agent's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
    },
    Pong,
    /// The process exists (a created container's init, or a started exec).
    Spawned {
        pid: i32,
        stdio: StdioPorts,
    },
    /// The request succeeded and has nothing to report.
    Done,
    Exited {
        status: ExitStatus,
    },
    /// libcgroups' statistics of the container's cgroup, as JSON.
    Stats {
        stats: serde_json::Value,
    },
    Error {
        error: AgentError,
    },
}

impl Request {
    /// The message's name, for logs and errors (without its possibly large body).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::CreateContainer { .. } => "create_container",
            Request::StartContainer { .. } => "start_container",
            Request::ExecProcess { .. } => "exec_process",
            Request::SignalProcess { .. } => "signal_process",
            Request::WaitProcess { .. } => "wait_process",
            Request::ResizePty { .. } => "resize_pty",
            Request::Stats { .. } => "stats",
            Request::DeleteContainer { .. } => "delete_container",
            Request::Shutdown => "shutdown",
        }
    }
}
