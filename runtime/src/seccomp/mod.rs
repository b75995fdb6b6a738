//! Per-thread seccomp filters for the `husk vmm` daemon.
//!
//! The allowlists live in `runtime/seccomp/<thread>.json` (one per [`ThreadKind`], every
//! rule commented), are checked and compiled to BPF by `build.rs`, and embedded here.
//! A thread calls [`install`] for its kind before it does any guest-driven work (a vCPU
//! thread before its first `KVM_RUN`); the filter then holds for the thread's lifetime
//! and is inherited by threads it starts. A call outside the list kills the whole
//! process (`SECCOMP_RET_KILL_PROCESS`): the kernel's audit log (dmesg, type=1326) names
//! the thread (`comm`, which is the thread name) and the syscall number, and
//! [`install`] logs which tid runs which filter, so a kill can be traced to a thread.

mod filters;
pub mod policy;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

pub use filters::{bpf, rule_count, syscalls};

/// Errors installing a filter or choosing a mode.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SeccompError {
    /// installing the {kind} seccomp filter on thread {thread} failed: {source}
    Apply {
        kind: ThreadKind,
        thread: String,
        source: seccompiler::Error,
    },
    /// unknown seccomp mode {0:?}; use `kill` (the default), or in development builds `log` or `off`
    UnknownMode(String),
    /// seccomp mode `{0}` is for development builds only; release builds always kill on a call outside the allowlist
    DevelopmentOnly(String),
    /// dropping the capabilities of thread {thread} failed: {reason}
    Capabilities { thread: String, reason: String },
}

/// The threads of the vmm daemon that get their own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A vCPU thread: KVM_RUN and the device models reached from guest exits.
    Vcpu,
    /// The VMM thread running the event loop: device queues, vsock, vCPU control.
    EventLoop,
    /// The control-socket thread: requests from the CLI and the shim, the agent client.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Control];

    /// The filter's name: its JSON file is `runtime/seccomp/<name>.json`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event_loop",
            ThreadKind::Control => "control",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens on a syscall outside a thread's allowlist (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the process. The only mode of release builds.
    #[default]
    Kill,
    /// Allow the call and write it to the kernel audit log: for finding missing rules.
    Log,
    /// No filter at all.
    Off,
}

impl SeccompMode {
    /// Parses `--seccomp`; `log` and `off` only when `development` (debug builds).
    pub fn parse(s: &str, development: bool) -> Result<Self, SeccompError> {
        let mode = match s {
            "kill" => return Ok(SeccompMode::Kill),
            "log" => SeccompMode::Log,
            "off" => SeccompMode::Off,
            other => return Err(SeccompError::UnknownMode(other.into())),
        };
        if development {
            Ok(mode)
        } else {
            Err(SeccompError::DevelopmentOnly(s.into()))
        }
    }
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, cfg!(debug_assertions))
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

fn current_thread_name() -> String {
    let tid = nix::unistd::gettid();
    let name = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    format!("{name} (tid {tid})")
}

/// Installs the `kind` filter in `mode` on the calling thread (and the threads it starts
/// later). Sets no_new_privs, which seccomp requires of an unprivileged thread.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let thread = current_thread_name();
    let Some(program) = bpf(kind, mode) else {
        log::warn!("seccomp: mode off, thread {thread} ({kind}) runs without a filter");
        return Ok(());
    };
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Apply {
        kind,
        thread: thread.clone(),
        source,
    })?;
    log::info!(
        "seccomp: {kind} filter ({} syscalls, mode {mode}) installed on thread {thread}",
        syscalls(kind).len()
    );
    Ok(())
}

/// The daemon's policy, set once before its first thread starts (see [`confine_process`]).
static PROCESS_MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Makes every later [`install_configured`] call install its filter in `mode`. The vmm
/// daemon calls it first thing, so the VMM's threads (started deep inside `vmm::`) need
/// no mode passed through every constructor; processes that never call it (`husk vmm
/// boot`, the tests of the VMM core) run unfiltered. A second call keeps the first mode.
pub fn confine_process(mode: SeccompMode) {
    let _ = PROCESS_MODE.set(mode);
}

/// The mode set by [`confine_process`], if any.
pub fn process_mode() -> Option<SeccompMode> {
    PROCESS_MODE.get().copied()
}

/// When the process is confined ([`confine_process`]): drops every capability of the
/// calling thread (capabilities are per thread; the jailer's
/// [`crate::jailer::drop_thread_capabilities`]) and installs `kind`'s filter on it. A
/// no-op otherwise. Called at the top of each thread of the vmm daemon.
pub fn install_configured(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(mode) = process_mode() else {
        return Ok(());
    };
    crate::jailer::drop_thread_capabilities().map_err(|e| SeccompError::Capabilities {
        thread: current_thread_name(),
        reason: e.to_string(),
    })?;
    install(kind, mode)
}
