//! The virtiofsd process behind a virtio-fs device: started on the share directory, waited
//! for until its vhost-user socket listens, watched (a pidfd the event loop can poll), and
//! killed and reaped when the device goes away, socket file included.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of virtiofsd's stderr an error quotes.
const STDERR_TAIL_BYTES: u64 = 2048;
/// How long virtiofsd gets to follow its killed worker before its whole group is killed.
const REAP_GRACE: Duration = Duration::from_secs(1);

/// Errors starting or running virtiofsd.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VirtiofsdError {
    /// virtio-fs share directory {0} does not exist or is not a directory; create it (it holds the containers' rootfs) or fix the path
    ShareDir(PathBuf),
    /// virtiofsd binary {0} does not exist; run `scripts/setup.sh` or point HUSK_VIRTIOFSD at a virtiofsd binary
    Binary(PathBuf),
    /// virtiofsd socket directory {path} is unusable: {source}
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// cannot create the capture file for virtiofsd's stderr: {0}
    Stderr(#[source] std::io::Error),
    /// starting virtiofsd ({binary}) failed: {source}
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// cannot watch virtiofsd (pidfd_open): {0}
    Pidfd(#[source] std::io::Error),
    /// virtiofsd exited ({status}) before its socket {socket} was ready; its stderr ends with:
    /// {stderr}
    ExitedEarly {
        status: ExitStatus,
        socket: PathBuf,
        stderr: String,
    },
    /// cannot connect to virtiofsd's socket {socket}: {source}
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// virtiofsd did not listen on {socket} within {timeout:?}; its stderr ends with:
    /// {stderr}
    SocketTimeout {
        socket: PathBuf,
        timeout: Duration,
        stderr: String,
    },
    /// virtiofsd (pid {pid}) died ({status}); its stderr ends with:
    /// {stderr}
    Died {
        pid: u32,
        status: ExitStatus,
        stderr: String,
    },
}

/// The cache policy virtiofsd applies (and tells the guest's FUSE client).
///
/// The default, [`CacheMode::Auto`], is chosen on purpose: a container's rootfs is a bind
/// mount of the bundle's directory, which the host may still change while the container
/// runs (`docker cp`, an engine writing `/etc/hosts`, a user editing a bind-mounted file).
/// `auto` caches attributes and data in the guest for a short time and revalidates on
/// open (close-to-open consistency), so those changes show up. `always` would save FUSE
/// round trips, which are dear here (the guest kernel is emulated on PVM hosts), but would
/// serve stale data indefinitely; `never` would send every lookup to the host. A read-only,
/// host-immutable share could use `always`: measure before changing the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    Never,
    Metadata,
    #[default]
    Auto,
    Always,
}

impl CacheMode {
    fn as_arg(self) -> &'static str {
        match self {
            CacheMode::Never => "never",
            CacheMode::Metadata => "metadata",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        }
    }
}

/// How to start virtiofsd.
#[derive(Debug, Clone)]
pub struct VirtiofsdConfig {
    /// The virtiofsd binary (see [`crate::artifacts::Artifact::Virtiofsd`]).
    pub binary: PathBuf,
    /// The directory the guest sees as the root of the file system.
    pub share_dir: PathBuf,
    /// The vhost-user socket virtiofsd listens on (its directory must exist).
    pub socket_path: PathBuf,
    pub cache: CacheMode,
    /// How long virtiofsd may take to listen on its socket.
    pub start_timeout: Duration,
}

impl VirtiofsdConfig {
    pub fn new(binary: PathBuf, share_dir: PathBuf, socket_path: PathBuf) -> Self {
        Self {
            binary,
            share_dir,
            socket_path,
            cache: CacheMode::default(),
            start_timeout: Duration::from_secs(10),
        }
    }

    /// The command line. Each flag is here for a reason:
    /// - `--sandbox namespace`: virtiofsd chroots into the share in its own mount, pid and
    ///   net namespaces, so a compromised guest that takes over virtiofsd sees only the share.
    /// - `--seccomp kill`: its own syscall allowlist, a second wall behind the sandbox.
    /// - `--announce-submounts`: each container's rootfs is a separate bind mount inside
    ///   the share; announcing them gives each its own `st_dev` in the guest, so inode
    ///   numbers from different host file systems cannot collide.
    /// - `--inode-file-handles=never`: O_PATH fds work on every host file system; file
    ///   handles need CAP_DAC_READ_SEARCH and file-system support we do not check for.
    /// - `--log-level warn`: stderr goes to a capture file quoted in errors; per-request
    ///   info logs would only grow it.
    ///
    /// The socket is named relative to virtiofsd's working directory (the socket's
    /// directory): a sandbox's directory can be deeper than a socket address holds (108
    /// bytes; Docker's 64-character container ids under `/run/docker/runtime-runc/moby`).
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--socket-path".into(),
            self.socket_path
                .file_name()
                .unwrap_or(self.socket_path.as_os_str())
                .into(),
            "--shared-dir".into(),
            self.share_dir.clone().into(),
        ];
        for flag in [
            "--sandbox=namespace",
            "--seccomp=kill",
            "--announce-submounts",
            "--inode-file-handles=never",
            "--log-level=warn",
        ] {
            args.push(flag.into());
        }
        args.push(format!("--cache={}", self.cache.as_arg()).into());
        args
    }
}

/// A running virtiofsd. Dropping it kills it (and the sandboxed child it forked), reaps
/// it and removes its socket file.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    pidfd: OwnedFd,
    stderr: File,
    socket_path: PathBuf,
    /// The socket's directory (`O_PATH`): the socket is reached as
    /// `/proc/self/fd/<this>/<name>`, short whatever the directory's depth.
    socket_dir: OwnedFd,
    exit: Option<ExitStatus>,
    /// Left running on drop: its connection went to a jailed vmm (see [`Virtiofsd::detach`]).
    detached: bool,
}

impl Virtiofsd {
    /// Starts virtiofsd and connects to its socket. virtiofsd serves exactly one
    /// connection (and exits when it closes), so the connection is returned with it.
    pub fn start(config: &VirtiofsdConfig) -> Result<(Self, UnixStream), VirtiofsdError> {
        if !config.share_dir.is_dir() {
            return Err(VirtiofsdError::ShareDir(config.share_dir.clone()));
        }
        if !config.binary.is_file() {
            return Err(VirtiofsdError::Binary(config.binary.clone()));
        }
        let socket_dir = config.socket_path.parent().unwrap_or(Path::new("."));
        if !socket_dir.is_dir() {
            return Err(VirtiofsdError::SocketDir {
                path: socket_dir.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        // A socket left by a virtiofsd that was killed would refuse our connection until
        // the new one replaces it. (Its pid file is harmless: virtiofsd relocks it.)
        remove_socket(&config.socket_path).map_err(|source| VirtiofsdError::SocketDir {
            path: config.socket_path.clone(),
            source,
        })?;
        let socket_dir_fd = nix::fcntl::open(
            socket_dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| VirtiofsdError::SocketDir {
            path: socket_dir.to_path_buf(),
            source: e.into(),
        })?;
        // SAFETY: open returned a new fd that nothing else owns.
        let socket_dir_fd = unsafe { OwnedFd::from_raw_fd(socket_dir_fd) };
        let stderr = memfd_file(c"husk-virtiofsd-stderr").map_err(VirtiofsdError::Stderr)?;
        let child = Command::new(&config.binary)
            .args(config.args())
            .current_dir(socket_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.try_clone().map_err(VirtiofsdError::Stderr)?)
            // Its own process group, so that a last-resort kill reaches the sandboxed
            // worker it forks too.
            .process_group(0)
            .spawn()
            .map_err(|source| VirtiofsdError::Spawn {
                binary: config.binary.clone(),
                source,
            })?;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let mut orphan = child;
                let _ = orphan.kill();
                let _ = orphan.wait();
                return Err(VirtiofsdError::Pidfd(e));
            }
        };
        let mut daemon = Self {
            child,
            pidfd,
            stderr,
            socket_path: config.socket_path.clone(),
            socket_dir: socket_dir_fd,
            exit: None,
            detached: false,
        };
        // On error `daemon` is dropped here: killed, reaped, socket removed.
        let stream = daemon.connect_when_ready(config.start_timeout)?;
        Ok((daemon, stream))
    }

    fn connect_when_ready(&mut self, timeout: Duration) -> Result<UnixStream, VirtiofsdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Err(VirtiofsdError::ExitedEarly {
                    status,
                    socket: self.socket_path.clone(),
                    stderr: self.stderr_tail(),
                });
            }
            let short = Path::new("/proc/self/fd")
                .join(self.socket_dir.as_raw_fd().to_string())
                .join(self.socket_path.file_name().unwrap_or_default());
            match UnixStream::connect(&short) {
                Ok(stream) => return Ok(stream),
                // Not bound yet, or bound but not listening yet.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(source) => {
                    return Err(VirtiofsdError::Connect {
                        socket: self.socket_path.clone(),
                        source,
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(VirtiofsdError::SocketTimeout {
                    socket: self.socket_path.clone(),
                    timeout,
                    stderr: self.stderr_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Lets virtiofsd run on without this handle and returns its pid. For the jail's
    /// launcher: the connection went to the jailed vmm (which is not virtiofsd's parent and,
    /// as another uid, may not signal it); virtiofsd exits by itself when that connection
    /// closes, and is reaped by the subreaper or init that inherits it.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.child.id()
    }

    /// The pid of the process started (virtiofsd forks its sandboxed worker from it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sandboxed worker's pid (the process that serves the guest), if it runs.
    pub fn worker_pid(&self) -> Option<u32> {
        children_of(self.child.id() as libc::pid_t)
            .first()
            .map(|&p| p as u32)
    }

    /// Readable once virtiofsd has exited: for the event loop.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The exit status, if virtiofsd has exited (reaps it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// `Err(Died)` with the stderr tail if virtiofsd has exited, `Ok` while it runs.
    pub fn check_alive(&mut self) -> Result<(), VirtiofsdError> {
        match self.try_exit_status() {
            None => Ok(()),
            Some(status) => Err(VirtiofsdError::Died {
                pid: self.child.id(),
                status,
                stderr: self.stderr_tail(),
            }),
        }
    }

    /// The last lines virtiofsd wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let mut file = &self.stderr;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(STDERR_TAIL_BYTES);
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
            return String::from("(stderr unreadable)");
        }
        let text = String::from_utf8_lossy(&buf).trim().to_string();
        if text.is_empty() {
            String::from("(nothing)")
        } else {
            text
        }
    }

    fn kill_and_reap(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // A confined VMM may not open /proc (its seccomp filters allow no open): it
        // kills the whole process group below instead, and the orphaned worker is reaped
        // by the daemon's reaper or init.
        let confined = crate::seccomp::process_mode()
            .is_some_and(|mode| mode != crate::seccomp::SeccompMode::Off);
        if !confined && self.try_exit_status().is_none() {
            // Kill the sandboxed worker first, so that the process we started (which waits
            // for it) reaps it and exits, rather than leaving it to init. The worker is the
            // init of its own pid namespace: only SIGKILL from outside is sure to reach it.
            for worker in children_of(pid) {
                // SAFETY: kill(2) with a pid and a valid signal; no memory is involved.
                unsafe { libc::kill(worker, libc::SIGKILL) };
            }
            let deadline = Instant::now() + REAP_GRACE;
            while self.try_exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // Whatever is still in the group we created at spawn (everything, if the worker
        // could not be found; an orphaned worker, if virtiofsd died first).
        // SAFETY: kill(2) on our own process group with signal 0 / SIGKILL; no memory.
        if unsafe { libc::kill(-pid, 0) } == 0 {
            // SAFETY: as above.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill_and_reap();
        // A SIGKILLed virtiofsd cannot remove its socket, nor the pid file it keeps next
        // to it (locked while it runs, to refuse a second instance on the same socket).
        let _ = remove_socket(&self.socket_path);
        let _ = remove_socket(&pid_file(&self.socket_path));
    }
}

fn remove_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where virtiofsd writes its pid: `<socket>.pid`.
pub fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// The pids of `pid`'s children, from /proc (empty if it cannot be read).
fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn memfd_file(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}
