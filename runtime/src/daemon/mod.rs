//! The `husk vmm` daemon: one per VM sandbox, a re-exec of the `husk` binary
//! (`husk vmm daemon --config FILE --ready-fd N`, hidden).
//!
//! ```text
//! husk create ──spawn──> husk vmm daemon            (its pid: --pid-file, the container pid)
//!   │ waits on the ready pipe     ├─ share: <entry>/share/<cid>/rootfs  (bind of the bundle rootfs)
//!   │                             ├─ guest: GuestBackend::start -> a Connector to the agent
//!   │                             ├─ CreateContainer (exec barrier), stdio streams connected
//!   │ <── "ok PID" ───────────────┤
//!   │                             ├─ control thread: <run>/control.sock (JSON lines)
//!   exits                         └─ main thread: WaitProcess(init) -> shutdown -> exit(code)
//! ```
//!
//! A microVM's daemon runs jailed ([`jailed`]): the process `create` starts is a launcher
//! that makes what needs the host (share, tap, template, virtiofsd, console pty), enters
//! the jail, and answers `ok PID` with the jailed child's host pid once that child has
//! the container at the exec barrier; the child then runs the sequence drawn above.
//!
//! - [`jailed`]: the launcher and the jailed vmm's start.
//! - [`layout`]: where every file of a VM sandbox lives (shared by the CLI side and the daemon).
//! - [`config`]: what `create` hands the daemon.
//! - [`guest`]: the narrow seam "start the guest, give me a connector, stop it":
//!   the real microVM ([`vm_guest`]) or, for tier-2 tests only, `husk-agent` on the host.
//! - [`control`]: the control socket (server in the daemon, client in the CLI).
//! - [`relay`]: the container's stdio (or pty) over the agent's per-process streams.
//! - [`ready`]: the pipe on which a child tells its parent "created, pid N" or why not.
//! - [`share`]: the per-sandbox virtio-fs share and the rootfs bind mount.
//! - [`exec`]: the helper process that represents one `husk exec` on the host.
//! - [`member`]: the host process of a pod's container that runs in its sandbox's VM.
//! - [`run`]: the daemon's main sequence.
//!
//! **Why two paths to the guest.** `start`, `state`, `kill`, `pause`/`resume` and
//! shutdown go through the daemon's control socket: the daemon owns the container's
//! status and the VM (pausing means pausing its vCPUs). `exec` and `stats` go straight to
//! the agent over the VM's vsock socket (a host path): each exec needs its own host
//! process anyway (its pid is what Docker and the shim wait on), and that process can
//! connect its own stdio streams, so no fds pass through the confined daemon.

pub mod config;
pub mod control;
pub mod exec;
pub mod guest;
pub mod jailed;
pub mod layout;
pub mod liveness;
pub mod logger;
pub mod member;
pub mod ready;
pub mod relay;
pub mod run;
pub mod share;
pub mod vm_guest;

pub use config::{DaemonConfig, GuestKind};
pub use layout::Layout;

use husk_protocol::client::ClientError;

/// Errors of the daemon and of the CLI's side of it.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DaemonError {
    /// {what} {path}: {source}
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// the daemon config {path} is unreadable ({source}): the sandbox is corrupt, `husk delete --force` it
    Config {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    /// {0}
    Guest(#[from] guest::GuestError),
    /// {step}: {source}
    Agent {
        step: &'static str,
        source: ClientError,
    },
    /// {0}
    Share(#[from] share::ShareError),
    /// {0}
    GuestSpec(#[from] crate::net::guest::GuestSpecError),
    /// {0}
    Relay(#[from] relay::RelayError),
    /// {0}
    Control(#[from] control::ControlError),
    /// {0}
    Ready(#[from] ready::ReadyError),
    /// {0}
    Jail(#[from] crate::jailer::JailError),
    /// {0}
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// starting virtiofsd for the jailed vmm: {0}
    Virtiofsd(#[source] crate::vmm::devices::virtio::fs::VirtiofsdError),
    /// process.terminal is true but no --console-socket was given: pass --console-socket SOCKET (runc needs it too)
    NoConsoleSocket,
    /// the bundle's process section is missing: add "process" to config.json
    NoProcess,
}

/// `map_err` helper for io errors that names what failed and on which path.
pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `map_err` helper for agent calls.
pub(crate) fn agent_err(step: &'static str) -> impl FnOnce(ClientError) -> DaemonError {
    move |source| DaemonError::Agent { step, source }
}

/// The name `ps` and `top` show for a sandbox's daemon (at most 15 bytes).
pub const DAEMON_PROCESS_NAME: &str = "husk-daemon";
/// The name `ps` and `top` show for a relay: a detached exec's, or a pod member's (at
/// most 15 bytes).
pub const EXEC_RELAY_PROCESS_NAME: &str = "husk-relay";

/// Names this process, so operators (and a subreaper reaping orphans) can tell the
/// long-lived helpers from the short `husk` commands that started them.
pub fn name_process(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        // Only cosmetic: a failure leaves the name `husk`.
        let _ = nix::sys::prctl::set_name(&name);
    }
}
