//! The daemon's control socket, `<run>/control.sock`: one JSON request per line, one JSON
//! response per line, then the daemon closes the connection. The daemon owns the
//! container's status; the CLI asks it here for `state`, `start`, `kill`, `pause`,
//! `resume` and `delete` (shutdown).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocol::client::AgentClient;
use husk_protocol::connector::Connector;
use husk_protocol::messages::ProcessRef;
use serde::{Deserialize, Serialize};

use super::guest::GuestBackend;
use crate::oci::Status;

/// How long the CLI waits for an answer (a kill or pause goes through the guest).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ControlError {
    /// binding the control socket {path:?} failed: {source}
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the vmm daemon does not answer on {path:?} ({source}); it has exited or is exiting
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the vmm daemon sent a bad answer on {path:?}: {detail}
    BadAnswer { path: PathBuf, detail: String },
}

/// A request from the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    State,
    Start,
    Kill {
        signal: i32,
        /// Every process of the container (`kill --all`), not only its init.
        #[serde(default)]
        all: bool,
    },
    Pause,
    Resume,
    /// Kill the container (if it still runs), stop the guest, exit.
    Shutdown,
    /// The vCPUs' KVM statistics (`husk inspect`).
    KvmStats,
    /// Test-only (debug builds): the control thread makes a syscall outside its seccomp
    /// allowlist (`getcwd`), so a test can watch the filter kill the daemon.
    #[cfg(debug_assertions)]
    ForbiddenSyscall,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done; the status after the request.
    Ok { status: Status },
    /// Not allowed in this status.
    WrongStatus { status: Status },
    /// The guest or agent failed.
    Failed { message: String },
    /// The answer to [`ControlRequest::KvmStats`].
    KvmStats {
        vcpus: Vec<crate::inspect::kvm_stats::VcpuStats>,
    },
}

/// What the control thread and the main thread share.
pub struct Shared {
    pub id: String,
    pub status: Mutex<Status>,
    pub connector: Box<dyn Connector>,
    pub guest: Mutex<Box<dyn GuestBackend>>,
}

impl Shared {
    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_status(&self, status: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    fn init(&self) -> ProcessRef {
        ProcessRef {
            container_id: self.id.clone(),
            exec_id: None,
        }
    }

    fn agent(&self) -> Result<AgentClient, String> {
        AgentClient::connect(&*self.connector).map_err(|e| e.to_string())
    }

    fn handle(&self, request: ControlRequest) -> ControlResponse {
        use ControlRequest as R;
        match request {
            R::KvmStats => {
                return match crate::inspect::kvm_stats::read_all() {
                    Ok(vcpus) => ControlResponse::KvmStats { vcpus },
                    Err(e) => ControlResponse::Failed {
                        message: e.to_string(),
                    },
                }
            }
            #[cfg(debug_assertions)]
            R::ForbiddenSyscall => {
                log::warn!("test trigger: calling getcwd, which no allowlist has");
                let mut buf = [0u8; 256];
                // SAFETY: getcwd writes at most buf.len() bytes into buf.
                unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
                return ControlResponse::Failed {
                    message: "getcwd returned: the seccomp filter is not installed".into(),
                };
            }
            _ => {}
        }
        let status = self.status();
        let allowed = match request {
            R::State | R::Shutdown => true,
            R::KvmStats => true,
            #[cfg(debug_assertions)]
            R::ForbiddenSyscall => true,
            R::Start => status == Status::Created,
            R::Kill { .. } => matches!(status, Status::Created | Status::Running | Status::Paused),
            R::Pause => status == Status::Running,
            R::Resume => status == Status::Paused,
        };
        if !allowed {
            return ControlResponse::WrongStatus { status };
        }
        let result = match request {
            R::State => Ok(status),
            R::Start => self
                .agent()
                .and_then(|mut a| a.start_container(&self.id).map_err(|e| e.to_string()))
                .map(|()| self.transition(Status::Created, Status::Running)),
            R::Kill { signal, all } if status == Status::Paused => self.kill_paused(signal, all),
            R::Kill { signal, all } => self.signal(signal, all).map(|()| self.status()),
            R::Pause => self.with_guest(|g| g.pause(), Status::Paused),
            R::Resume => self.with_guest(|g| g.resume(), Status::Running),
            R::KvmStats => Ok(status),
            #[cfg(debug_assertions)]
            R::ForbiddenSyscall => Ok(status),
            R::Shutdown => {
                if status != Status::Stopped {
                    if status == Status::Paused {
                        let _ = self.with_guest(|g| g.resume(), Status::Running);
                    }
                    // The main thread's WaitProcess returns and it shuts the guest down.
                    let _ = self.signal(libc::SIGKILL, false);
                }
                Ok(self.status())
            }
        };
        match result {
            Ok(status) => ControlResponse::Ok { status },
            Err(message) => ControlResponse::Failed { message },
        }
    }

    fn signal(&self, signal: i32, all: bool) -> Result<(), String> {
        self.agent().and_then(|mut a| {
            if all {
                a.signal_container(&self.id, signal)
            } else {
                a.signal_process(self.init(), signal)
            }
            .map_err(|e| e.to_string())
        })
    }

    /// The agent of a paused guest cannot answer, so the guest is resumed for the
    /// signal. As with runc's frozen containers, SIGKILL ends the container at once; any
    /// other signal waits for `resume` (the guest is paused again).
    fn kill_paused(&self, signal: i32, all: bool) -> Result<Status, String> {
        self.with_guest(|g| g.resume(), Status::Running)?;
        let sent = self.signal(signal, all);
        if signal != libc::SIGKILL {
            let mut guest = self.guest.lock().unwrap_or_else(|e| e.into_inner());
            // Not if the container ended meanwhile: the main thread stops the guest.
            if self.status() == Status::Running {
                guest.pause().map_err(|e| e.to_string())?;
                self.transition(Status::Running, Status::Paused);
            }
        }
        sent.map(|()| self.status())
    }

    /// Moves `from` -> `to` unless the container stopped meanwhile.
    fn transition(&self, from: Status, to: Status) -> Status {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if *s == from {
            *s = to;
        }
        *s
    }

    fn with_guest(
        &self,
        op: impl FnOnce(&mut dyn GuestBackend) -> Result<(), super::guest::GuestError>,
        then: Status,
    ) -> Result<Status, String> {
        let mut guest = self.guest.lock().unwrap_or_else(|e| e.into_inner());
        op(guest.as_mut()).map_err(|e| e.to_string())?;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        // A container that ended meanwhile stays stopped.
        if *status != Status::Stopped {
            *status = then;
        }
        Ok(*status)
    }
}

/// Binds the control socket (mode 0600: only root and the daemon's user).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves requests one at a time until the process exits.
pub fn serve(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if let Err(e) = serve_one(&stream, &shared) {
            log::warn!("control connection: {e}");
        }
    }
}

fn serve_one(stream: &UnixStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(request) => shared.handle(request),
        Err(e) => ControlResponse::Failed {
            message: format!("bad control request {line:?}: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&*stream).write_all(&out)
}

/// Sends one request to the daemon at `path`.
pub fn call(path: &Path, request: ControlRequest) -> Result<ControlResponse, ControlError> {
    let unreachable = |source| ControlError::Unreachable {
        path: path.to_path_buf(),
        source,
    };
    let stream = husk_protocol::connector::connect_unix(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(unreachable)?;
    let mut out = serde_json::to_vec(&request).expect("requests serialize");
    out.push(b'\n');
    (&stream).write_all(&out).map_err(unreachable)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(unreachable)?;
    serde_json::from_str(&line).map_err(|e| ControlError::BadAnswer {
        path: path.to_path_buf(),
        detail: format!("{e}: {line:?}"),
    })
}
