//! Where the files of one VM sandbox live, under the store entry `<root>/<id>/`:
//!
//! ```text
//! daemon.json            DaemonConfig (written by create)
//! daemon.log             the daemon's own messages (its stdio is the container's)
//! vmm.json               the daemon's pid and start time (liveness, pid reuse)
//! share/                 the virtio-fs share: share/<id>/rootfs = bind of the bundle rootfs
//! run/                   sockets when not jailed: control.sock, guest.json, agent/, vsock.sock;
//!                        always: virtiofsd.sock (+ .pid), net.json (the launcher's, host side)
//! vm/<id>/jail/          the jail when jailed (`Jail::remove` deletes vm/<id>):
//! vm/<id>/jail/run/      control.sock, guest.json, vsock.sock (the jail's /run)
//! ```

use std::path::{Path, PathBuf};

/// The control socket's name in the run directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// How to reach the agent (`GuestAddress` as JSON), in the run directory.
pub const GUEST_FILE: &str = "guest.json";

/// The paths of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    entry: PathBuf,
    id: String,
    jailed: bool,
}

impl Layout {
    pub fn new(entry: &Path, id: &str, jailed: bool) -> Self {
        Self {
            entry: entry.to_path_buf(),
            id: id.to_string(),
            jailed,
        }
    }

    pub fn entry(&self) -> &Path {
        &self.entry
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn jailed(&self) -> bool {
        self.jailed
    }

    pub fn config(&self) -> PathBuf {
        self.entry.join("daemon.json")
    }

    pub fn log(&self) -> PathBuf {
        self.entry.join("daemon.log")
    }

    pub fn vmm_file(&self) -> PathBuf {
        self.entry.join("vmm.json")
    }

    /// The directory shared with the guest over virtio-fs.
    pub fn share_dir(&self) -> PathBuf {
        self.entry.join("share")
    }

    /// The container's rootfs inside the share (a bind mount of the bundle's rootfs).
    pub fn rootfs_mount(&self) -> PathBuf {
        self.share_dir().join(&self.id).join("rootfs")
    }

    /// Copies of the bundle's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` bind
    /// sources, in the share so the guest sees them (see [`crate::net::guest`]).
    pub fn name_files(&self) -> PathBuf {
        self.share_dir().join(&self.id).join("etc")
    }

    /// `JailConfig::root`: the jail is made at `<this>/<id>/jail`.
    pub fn jail_root(&self) -> PathBuf {
        self.entry.join("vm")
    }

    /// Where the daemon's sockets are, as seen from the host.
    pub fn run_dir(&self) -> PathBuf {
        if self.jailed {
            self.jail_root().join(&self.id).join("jail").join("run")
        } else {
            self.entry.join("run")
        }
    }

    /// Where the unjailed side keeps what needs the host's view: virtiofsd's socket and
    /// pid file, the network record, the template VM's sockets. The run directory itself
    /// when not jailed.
    pub fn host_run_dir(&self) -> PathBuf {
        self.entry.join("run")
    }

    /// The pid file virtiofsd writes next to its socket (`husk inspect` finds it there:
    /// a jailed vmm's virtiofsd is not its child).
    pub fn virtiofsd_pid_file(&self) -> PathBuf {
        crate::vmm::devices::virtio::fs::virtiofsd::pid_file(
            &self
                .host_run_dir()
                .join(crate::vmm::guest::VIRTIOFSD_SOCKET),
        )
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join(CONTROL_SOCKET)
    }

    /// How to reach the agent (`GuestAddress` as JSON), for `exec` and `stats`.
    pub fn guest_file(&self) -> PathBuf {
        self.run_dir().join(GUEST_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailed_sockets_live_in_the_jail_run_dir() {
        let l = Layout::new(Path::new("/r/c1"), "c1", false);
        assert_eq!(l.control_socket(), Path::new("/r/c1/run/control.sock"));
        assert_eq!(l.rootfs_mount(), Path::new("/r/c1/share/c1/rootfs"));
        let j = Layout::new(Path::new("/r/c1"), "c1", true);
        assert_eq!(
            j.control_socket(),
            Path::new("/r/c1/vm/c1/jail/run/control.sock")
        );
        // The launcher's host side stays outside the jail.
        assert_eq!(j.host_run_dir(), Path::new("/r/c1/run"));
        assert_eq!(
            j.virtiofsd_pid_file(),
            Path::new("/r/c1/run/virtiofsd.sock.pid")
        );
    }
}
