//! The seam between the daemon and the guest: start it, say how to reach its agent,
//! stop it. Two implementations:
//! - [`super::vm_guest::MicroVm`]: the real one, a microVM with vsock and virtio-fs.
//! - [`HostAgent`], **test-only** (`HUSK_TEST_GUEST=host-agent`, see
//!   [`super::config::TEST_GUEST_ENV`]): `husk-agent --unix-dir` as a host process,
//!   with the share directory used in place, so tier-2 tests exercise the whole daemon
//!   and CLI without booting a kernel. It gives no isolation beyond the container's.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::client::AgentClient;
use husk_protocol::connector::{Connector, HybridVsockConnector, UnixDirConnector};
use serde::{Deserialize, Serialize};

/// How long the host agent gets to listen.
const HOST_AGENT_START: Duration = Duration::from_secs(20);
/// How long a guest gets to end after the agent's Shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors starting or stopping a guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum GuestError {
    /// starting {what} failed: {source}
    Spawn {
        what: String,
        source: std::io::Error,
    },
    /// the host agent did not listen on {0:?} within 20 s (see the agent log next to it)
    NotListening(PathBuf),
    /// booting the microVM failed: {0}
    Vm(#[from] crate::vmm::guest::GuestVmError),
    /// {0} is not supported by this guest
    Unsupported(&'static str),
    /// the container's network namespace: {0}
    Net(#[from] crate::net::NetError),
    /// cannot write the network record {path:?} (what `husk delete` removes): {source}
    NetRecord {
        path: PathBuf,
        source: std::io::Error,
    },
    /// cannot {0}: the guest is not running
    NotStarted(&'static str),
}

/// How the CLI side reaches the agent (`<run>/guest.json`), for `exec` and `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestAddress {
    /// `husk-agent --unix-dir DIR` on the host (tests).
    UnixDir { dir: PathBuf },
    /// The VMM's hybrid vsock socket.
    HybridVsock { socket: PathBuf },
}

impl GuestAddress {
    /// This address as seen by a process whose view of `inside` is `host` (the host's
    /// view of a jailed vmm's `/run`). Addresses elsewhere are unchanged.
    pub fn seen_from(&self, inside: &Path, host: &Path) -> Self {
        let relocate = |path: &Path| match path.strip_prefix(inside) {
            Ok(rest) => host.join(rest),
            Err(_) => path.to_path_buf(),
        };
        match self {
            GuestAddress::UnixDir { dir } => GuestAddress::UnixDir { dir: relocate(dir) },
            GuestAddress::HybridVsock { socket } => GuestAddress::HybridVsock {
                socket: relocate(socket),
            },
        }
    }

    pub fn connector(&self) -> Box<dyn Connector> {
        match self {
            GuestAddress::UnixDir { dir } => Box::new(UnixDirConnector::new(dir)),
            GuestAddress::HybridVsock { socket } => Box::new(HybridVsockConnector::new(socket)),
        }
    }
}

/// One guest, owned by the daemon.
pub trait GuestBackend: Send {
    /// Starts the guest with `share_dir` shared and its sockets in `run_dir`; returns
    /// once the agent answers.
    fn start(&mut self, share_dir: &Path, run_dir: &Path) -> Result<GuestAddress, GuestError>;
    /// `share_dir` as the agent sees it (a container's rootfs is `<this>/<id>/rootfs`).
    fn guest_share_dir(&self, share_dir: &Path) -> PathBuf;
    /// Freezes the guest (all vCPUs).
    fn pause(&mut self) -> Result<(), GuestError>;
    fn resume(&mut self) -> Result<(), GuestError>;
    /// Asks the agent to shut down, waits for the guest to end (killing it after a
    /// grace period) and releases what it holds (VM, virtiofsd, sockets).
    fn stop(&mut self);
}

/// Test-only guest: the agent as a host process.
pub struct HostAgent {
    binary: PathBuf,
    child: Option<Child>,
    sockets: PathBuf,
}

impl HostAgent {
    pub fn new(binary: &Path) -> Self {
        Self {
            binary: binary.to_path_buf(),
            child: None,
            sockets: PathBuf::new(),
        }
    }
}

impl GuestBackend for HostAgent {
    fn start(&mut self, _share_dir: &Path, run_dir: &Path) -> Result<GuestAddress, GuestError> {
        let spawn_err = |what: &str| {
            let what = what.to_string();
            move |source| GuestError::Spawn { what, source }
        };
        self.sockets = run_dir.join("agent");
        std::fs::create_dir_all(&self.sockets).map_err(spawn_err("the agent socket dir"))?;
        let log = File::create(run_dir.join("agent.log")).map_err(spawn_err("the agent log"))?;
        // Never the daemon's stdio: that is the container's, and a reader waiting for
        // its end of file must not wait for the agent too.
        let child = Command::new(&self.binary)
            .arg("--unix-dir")
            .arg(&self.sockets)
            .arg("--state-dir")
            .arg(run_dir.join("agent-state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err("the agent log"))?)
            .stderr(log)
            .spawn()
            .map_err(spawn_err(&self.binary.display().to_string()))?;
        self.child = Some(child);
        let connector = UnixDirConnector::new(&self.sockets);
        let deadline = Instant::now() + HOST_AGENT_START;
        while AgentClient::connect(&connector)
            .and_then(|mut c| c.ping())
            .is_err()
        {
            if Instant::now() > deadline {
                self.stop();
                return Err(GuestError::NotListening(self.sockets.clone()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(GuestAddress::UnixDir {
            dir: self.sockets.clone(),
        })
    }

    fn guest_share_dir(&self, share_dir: &Path) -> PathBuf {
        share_dir.to_path_buf()
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        Err(GuestError::Unsupported(
            "pause (the test-only host agent has no vCPUs)",
        ))
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        Err(GuestError::Unsupported(
            "resume (the test-only host agent has no vCPUs)",
        ))
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let connector = UnixDirConnector::new(&self.sockets);
        if let Ok(mut agent) = AgentClient::connect(&connector) {
            let _ = agent.shutdown();
        }
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jailed_address_is_published_with_the_host_path() {
        let inside = GuestAddress::HybridVsock {
            socket: "/run/vsock.sock".into(),
        };
        let host = Path::new("/r/c1/vm/c1/jail/run");
        assert_eq!(
            inside.seen_from(Path::new("/run"), host),
            GuestAddress::HybridVsock {
                socket: host.join("vsock.sock")
            }
        );
        // Not under the jail's run directory: unchanged.
        let other = GuestAddress::UnixDir {
            dir: "/elsewhere/agent".into(),
        };
        assert_eq!(other.seen_from(Path::new("/run"), host), other);
    }
}
