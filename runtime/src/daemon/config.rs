//! What `husk create` hands the daemon, as `<entry>/daemon.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, DaemonError, Layout};

/// Test-only: `HUSK_TEST_GUEST=host-agent` makes `--isolation vm` run the agent as a
/// host process instead of booting a microVM, so tier-2 tests drive the whole daemon and
/// CLI lifecycle in seconds. Never set it outside tests: there is no VM boundary then.
pub const TEST_GUEST_ENV: &str = "HUSK_TEST_GUEST";

/// How the daemon reaches a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestKind {
    /// A microVM booted from these files.
    Vm {
        kernel: PathBuf,
        initrd: PathBuf,
        vcpus: u8,
        mem_mib: u64,
        /// Where the guest's template is found or made; None boots cold.
        #[serde(default)]
        template_dir: Option<PathBuf>,
    },
    /// Test-only (see [`TEST_GUEST_ENV`]): `husk-agent --unix-dir` on the host.
    HostAgent { agent: PathBuf },
}

/// Everything the daemon needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonConfig {
    pub id: String,
    /// The store entry `<root>/<id>`.
    pub entry: PathBuf,
    pub bundle: PathBuf,
    /// The bundle's rootfs on the host.
    pub rootfs: PathBuf,
    /// Where to send the pty master when `process.terminal` is true.
    pub console_socket: Option<PathBuf>,
    pub guest: GuestKind,
    /// Enter the jailer before starting any thread (the VM guest only).
    pub jail: bool,
    /// `kill`, `log` or `off` (the last two in development builds only).
    pub seccomp: String,
}

impl DaemonConfig {
    pub fn layout(&self) -> Layout {
        Layout::new(&self.entry, &self.id, self.jail)
    }

    pub fn write(&self) -> Result<(), DaemonError> {
        let path = self.layout().config();
        let json = serde_json::to_vec_pretty(self).map_err(|source| DaemonError::Config {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, json).map_err(io_err("writing the daemon config", &path))
    }

    pub fn read(path: &Path) -> Result<Self, DaemonError> {
        let text = std::fs::read(path).map_err(io_err("reading the daemon config", path))?;
        serde_json::from_slice(&text).map_err(|source| DaemonError::Config {
            path: path.to_path_buf(),
            source,
        })
    }
}
