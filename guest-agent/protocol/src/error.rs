//! The typed errors that cross from the agent to the host.

use serde::{Deserialize, Serialize};

/// What went wrong in the agent, as the host sees it. Serialised in `Response::Error`.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, displaydoc::Display,
)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentError {
    /// protocol version mismatch: the host speaks {host}, the agent speaks {agent}; rebuild the guest initramfs and the host binary from the same source
    VersionMismatch { host: u32, agent: u32 },
    /// the first message on a control connection must be Hello, got {got}
    HandshakeRequired { got: String },
    /// no container with id {id}
    ContainerNotFound { id: String },
    /// container {container_id} has no process with exec id {exec_id}
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    /// a container with id {id} already exists; delete it first or pick another id
    ContainerExists { id: String },
    /// container {container_id} already has a process with exec id {exec_id}
    ProcessExists {
        container_id: String,
        exec_id: String,
    },
    /// invalid OCI spec: {reason}
    InvalidSpec { reason: String },
    /// invalid request: {reason}
    InvalidRequest { reason: String },
    /// the container runtime (libcontainer) failed: {message}
    Runtime { message: String },
    /// I/O in the agent failed while {context}: {message}
    Io { context: String, message: String },
    /// not supported by this agent: {what}
    Unsupported { what: String },
    /// internal error in the agent (a bug): {message}
    Internal { message: String },
}
