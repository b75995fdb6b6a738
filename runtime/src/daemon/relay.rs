//! The container's stdio on the host side: the daemon (or an exec helper) connects to
//! the stream ports the agent gave for the process and copies between them and its own
//! fds 0/1/2 (which `create`/`run`/`exec` inherited from their caller), or, with a
//! terminal, between a host pty whose master went to `--console-socket` and the
//! agent's pty stream.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use husk_protocol::connector::{ConnectError, Connector};
use husk_protocol::messages::StdioPorts;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::stat::fstat;

/// Errors connecting a process's stdio.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RelayError {
    /// connecting the {stream} stream failed: {source}
    Connect {
        stream: &'static str,
        source: ConnectError,
    },
    /// duplicating the daemon's {stream} fd failed: {source}
    Dup {
        stream: &'static str,
        source: nix::Error,
    },
    /// opening a pty for the container's terminal failed: {0}
    Pty(nix::Error),
    /// sending the pty master to the console socket {path:?} failed: {source}
    ConsoleSocket { path: PathBuf, source: io::Error },
    /// starting a relay thread failed: {0}
    Thread(io::Error),
    /// the agent gave no {0} port for this process
    NoPort(&'static str),
}

/// Whether the host has a stdin worth relaying (not /dev/null, not closed).
pub fn has_stdin() -> bool {
    let Ok(st) = fstat(0) else { return false };
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    !(is_char && st.st_rdev == libc::makedev(1, 3))
}

/// Running relays; output relays report on `done` when they reach end of file.
pub struct Relays {
    outputs: usize,
    done: Receiver<&'static str>,
}

impl Relays {
    /// Waits until the output streams are drained (the process's last output is on the
    /// host) or `timeout` passes; returns whether they were.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut left = self.outputs;
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(wait).is_err() {
                return false;
            }
            left -= 1;
        }
        true
    }
}

fn connect(
    connector: &dyn Connector,
    port: Option<u32>,
    stream: &'static str,
) -> Result<UnixStream, RelayError> {
    let port = port.ok_or(RelayError::NoPort(stream))?;
    connector
        .connect(port)
        .map_err(|source| RelayError::Connect { stream, source })
}

fn dup(fd: i32, stream: &'static str) -> Result<File, RelayError> {
    let owned = nix::unistd::dup(fd).map_err(|source| RelayError::Dup { stream, source })?;
    // SAFETY: dup returned a new fd that nothing else owns.
    Ok(File::from(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(owned)
    }))
}

fn spawn(
    name: &'static str,
    done: Option<Sender<&'static str>>,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), RelayError> {
    thread::Builder::new()
        .name(format!("husk-relay-{name}"))
        .spawn(move || {
            // Relays copy between fds the daemon already holds: the control allowlist.
            if let Err(e) = crate::seccomp::install_configured(crate::seccomp::ThreadKind::Control)
            {
                log::error!("{e}; the {name} relay does not run");
                return;
            }
            body();
            if let Some(done) = done {
                let _ = done.send(name);
            }
        })
        .map(drop)
        .map_err(RelayError::Thread)
}

/// Copies until end of file (or an error on either side).
fn copy(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = [0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
        let _ = to.flush();
    }
}

/// Relays the process's pipes to this process's fds 0, 1 and 2.
pub fn attach_pipes(connector: &dyn Connector, ports: StdioPorts) -> Result<Relays, RelayError> {
    // Connect everything first, so a failure starts no thread.
    let stdin = ports
        .stdin
        .map(|p| connect(connector, Some(p), "stdin"))
        .transpose()?;
    let stdout = connect(connector, ports.stdout, "stdout")?;
    let stderr = connect(connector, ports.stderr, "stderr")?;
    let (host_in, host_out, host_err) = (
        stdin.as_ref().map(|_| dup(0, "stdin")).transpose()?,
        dup(1, "stdout")?,
        dup(2, "stderr")?,
    );
    let (tx, done) = channel();
    for (name, mut from, mut to) in [("stdout", stdout, host_out), ("stderr", stderr, host_err)] {
        spawn(name, Some(tx.clone()), move || copy(&mut from, &mut to))?;
    }
    if let (Some(mut to), Some(mut from)) = (stdin, host_in) {
        spawn("stdin", None, move || {
            copy(&mut from, &mut to);
            // End of file for the process.
            let _ = to.shutdown(Shutdown::Write);
        })?;
    }
    Ok(Relays { outputs: 2, done })
}

/// Makes a host pty and sends its master to `console_socket` (as runc does); returns
/// the slave side for [`attach_pty`]. Done before the guest starts: a jailed vmm has
/// neither `/dev/ptmx` nor the host path of the console socket.
pub fn open_console(console_socket: &Path) -> Result<File, RelayError> {
    let pty = nix::pty::openpty(None, None).map_err(RelayError::Pty)?;
    // The guest's pty already has a line discipline (echo, ^C); the host one must be
    // transparent or every byte would be processed twice.
    let mut attrs = nix::sys::termios::tcgetattr(pty.slave.as_fd()).map_err(RelayError::Pty)?;
    nix::sys::termios::cfmakeraw(&mut attrs);
    nix::sys::termios::tcsetattr(
        pty.slave.as_fd(),
        nix::sys::termios::SetArg::TCSANOW,
        &attrs,
    )
    .map_err(RelayError::Pty)?;
    send_fd(console_socket, &pty.master).map_err(|source| RelayError::ConsoleSocket {
        path: console_socket.to_path_buf(),
        source,
    })?;
    drop(pty.master);
    Ok(File::from(pty.slave))
}

/// Relays the host pty's `slave` side (from [`open_console`]) to the process's pty
/// stream in both directions.
pub fn attach_pty(
    connector: &dyn Connector,
    ports: StdioPorts,
    slave: File,
) -> Result<Relays, RelayError> {
    let stream = connect(connector, ports.pty, "pty")?;
    let (mut slave_in, mut slave_out) = (slave.try_clone().map_err(RelayError::Thread)?, slave);
    let (mut stream_in, mut stream_out) = (stream.try_clone().map_err(RelayError::Thread)?, stream);
    let (tx, done) = channel();
    spawn("pty-out", Some(tx), move || {
        copy(&mut stream_out, &mut slave_out)
    })?;
    spawn("pty-in", None, move || copy(&mut slave_in, &mut stream_in))?;
    Ok(Relays { outputs: 1, done })
}

fn send_fd(socket: &Path, fd: &OwnedFd) -> io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(b"/dev/ptmx")];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}
