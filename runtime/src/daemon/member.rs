//! `husk vmm member` (hidden): the host process that stands for one container of a pod
//! whose sandbox container runs in a VM (CRI annotations, see
//! [`crate::sandbox::pod`]). The member runs in the sandbox's guest, so it needs no VMM of
//! its own; like the exec relay ([`super::exec`]) it talks to the sandbox's agent over the
//! VM's vsock socket:
//!
//! ```text
//! shim/husk create ──spawn──> husk vmm member --config <member entry>/member.json
//!   │                           ├─ bind the member's rootfs at <sandbox share>/<id>/rootfs
//!   │                           │  (the share is a shared mount: the bind reaches virtiofsd)
//!   │                           ├─ CreateContainer{pod_sandbox} -> the exec barrier
//!   │ <── "ok PID" ─────────────┤  stdio relays connected
//!   exits                       └─ WaitProcess(member) -> exit(code)
//! ```
//!
//! Its pid is the member's container pid; it exits with the member's exit code. `start`,
//! `kill`, `ps`, `delete` of the member go to the agent directly
//! ([`crate::sandbox::member`]).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use husk_protocol::client::AgentClient;
use husk_protocol::messages::{ProcessRef, StdioRequest};
use serde::{Deserialize, Serialize};

use super::ready::ReadyWriter;
use super::run::GuestBundle;
use super::{agent_err, exec, io_err, relay, share, DaemonError};

/// Exit code when the member was lost (agent or guest gone).
const LOST: i32 = 255;

/// The file in the member's state directory that describes it.
pub const MEMBER_FILE: &str = "member.json";

/// What `create` hands the member process, and what the member's later operations read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberConfig {
    pub id: String,
    /// The pod's sandbox container (its VM runs this member).
    pub sandbox_id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// The sandbox's virtio-fs share on the host.
    pub share_dir: PathBuf,
    /// Where the guest sees that share.
    pub guest_share_dir: PathBuf,
    /// How to reach the sandbox's agent (the sandbox's `guest.json`).
    pub guest_file: PathBuf,
    /// The sandbox's log, where a failed create is explained.
    pub log: PathBuf,
}

/// In a member's `share/<id>/` (and at the same place in the guest): its rootfs bind mount
/// and its name files.
const ROOTFS_DIR: &str = "rootfs";
const NAME_FILES_DIR: &str = "etc";

impl MemberConfig {
    /// `share/<id>`: everything of this member in the sandbox's share.
    pub fn share_subdir(&self) -> PathBuf {
        self.share_dir.join(&self.id)
    }

    /// `share/<id>/rootfs`: the bind mount of the member's rootfs.
    pub fn rootfs_mount(&self) -> PathBuf {
        self.share_subdir().join(ROOTFS_DIR)
    }

    pub fn write(&self, entry_dir: &Path) -> Result<(), DaemonError> {
        let path = entry_dir.join(MEMBER_FILE);
        let json = serde_json::to_vec_pretty(self).expect("a member config serializes");
        std::fs::write(&path, json).map_err(io_err("writing the member config", &path))
    }

    /// The member's config, or None when `create` failed before writing it.
    pub fn read(entry_dir: &Path) -> Result<Option<Self>, DaemonError> {
        let path = entry_dir.join(MEMBER_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading the member config", &path)(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| DaemonError::Config { path, source })
    }

    /// A control connection to the sandbox's agent.
    pub fn agent(&self) -> Result<AgentClient, DaemonError> {
        let connector = exec::guest_address(&self.guest_file)?.connector();
        AgentClient::connect(&*connector).map_err(agent_err("connecting to the pod's agent"))
    }

    /// Unmounts and removes what the member put in the sandbox's share (its rootfs and
    /// host mounts, its name files); missing pieces are fine.
    pub fn remove_share(&self) -> Result<(), share::ShareError> {
        remove_member_subdir(&self.share_subdir())
    }
}

/// What one member put in a sandbox's share: `share/<member>/`, its `rootfs` bind (with
/// the host mounts under it) and its name files.
fn remove_member_subdir(subdir: &Path) -> Result<(), share::ShareError> {
    crate::net::guest::remove_name_files(&subdir.join(NAME_FILES_DIR));
    share::remove(subdir, &subdir.join(ROOTFS_DIR))
}

/// Takes down the shares pod members still have in the sandbox `sandbox_id`'s share
/// (every `share/<id>/` but the sandbox's own), as each member's delete would: a pod's
/// sandbox deleted before its members (its VM, and with it the members, are gone) leaves
/// their records only, whose deletes then find nothing left to unmount.
pub fn remove_member_shares(share_dir: &Path, sandbox_id: &str) -> Result<(), share::ShareError> {
    let Ok(entries) = std::fs::read_dir(share_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && entry.file_name() != sandbox_id {
            remove_member_subdir(&entry.path())?;
        }
    }
    Ok(())
}

/// Runs the member process; returns its exit code.
pub fn main(config: &Path, ready_fd: RawFd) -> i32 {
    let ready = match ReadyWriter::from_raw(ready_fd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("husk vmm member: {e}");
            return LOST;
        }
    };
    let dir = config.parent().unwrap_or(Path::new("."));
    let config = match MemberConfig::read(dir) {
        Ok(Some(c)) => c,
        Ok(None) => {
            ready.err(&format!("no {MEMBER_FILE} in {}", dir.display()));
            return LOST;
        }
        Err(e) => {
            ready.err(&e.to_string());
            return LOST;
        }
    };
    let started = start(&config);
    if started.is_err() {
        let _ = config.remove_share();
    }
    let init = ProcessRef {
        container_id: config.id.clone(),
        exec_id: None,
    };
    exec::serve(ready, started, init)
}

/// The share, the guest's spec, the container at the exec barrier, its stdio relays.
fn start(config: &MemberConfig) -> Result<(relay::Relays, AgentClient), DaemonError> {
    let GuestBundle {
        mut spec,
        terminal,
        console_socket,
        readonly,
    } = GuestBundle::load(
        &config.bundle,
        &config.rootfs,
        config.console_socket.as_ref(),
    )?;
    share::prepare_member(
        &config.share_subdir(),
        &config.rootfs_mount(),
        &config.rootfs,
        readonly,
    )?;
    crate::sandbox::hooks::keep_guest_hooks(&mut spec);
    let in_guest = config.guest_share_dir.join(&config.id);
    share::bind_host_mounts(
        &mut spec,
        &share::mounts_dir(&config.rootfs_mount()),
        &in_guest.join("mounts"),
    )?;
    crate::net::guest::copy_name_files(
        &mut spec,
        &config.share_subdir().join(NAME_FILES_DIR),
        &in_guest.join(NAME_FILES_DIR),
    )?;
    let console = console_socket
        .map(|s| relay::open_console(&s))
        .transpose()?;
    let connector = exec::guest_address(&config.guest_file)?.connector();
    let stdio = StdioRequest {
        stdin: !terminal && relay::has_stdin(),
    };
    let spawned = AgentClient::connect(&*connector)
        .and_then(|mut a| {
            a.create_pod_member(
                &config.id,
                spec,
                in_guest.join(ROOTFS_DIR),
                stdio,
                Some(&config.sandbox_id),
            )
        })
        .map_err(agent_err("creating the pod member in the sandbox's guest"))?;
    let relays = match console {
        Some(slave) => relay::attach_pty(&*connector, spawned.stdio, slave)?,
        None => relay::attach_pipes(&*connector, spawned.stdio)?,
    };
    let waiter = AgentClient::connect(&*connector).map_err(agent_err("connecting to the agent"))?;
    Ok((relays, waiter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_round_trips_and_names_the_share_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(MemberConfig::read(dir.path()).unwrap(), None);
        let config = MemberConfig {
            id: "app".into(),
            sandbox_id: "pod".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            console_socket: None,
            share_dir: "/r/pod/share".into(),
            guest_share_dir: "/run/husk/share".into(),
            guest_file: "/r/pod/run/guest.json".into(),
            log: "/r/pod/vmm.log".into(),
        };
        config.write(dir.path()).unwrap();
        assert_eq!(
            MemberConfig::read(dir.path()).unwrap(),
            Some(config.clone())
        );
        assert_eq!(config.rootfs_mount(), Path::new("/r/pod/share/app/rootfs"));
        std::fs::write(dir.path().join(MEMBER_FILE), "{").unwrap();
        let err = MemberConfig::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(MEMBER_FILE), "{err}");
    }
}
