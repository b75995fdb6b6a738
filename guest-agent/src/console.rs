//! Ptys for processes with `process.terminal`: libcontainer opens the pty inside the
//! container and sends its master end over a Unix "console socket" (runc's convention);
//! the agent receives it and relays it on one port, both directions.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::ports::PortAllocator;
use crate::stdio::{copy, spawn_relay};
use crate::transport::{Listener, Transport, TransportError};

/// How long libcontainer may take to send the pty after the container exists.
const MASTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting up a pty.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConsoleError {
    /// creating the console socket {path} failed: {source}
    Bind { path: PathBuf, source: io::Error },
    /// the container never sent its pty master over the console socket
    NoMaster,
    /// {0}
    Listen(#[from] TransportError),
    /// setting the pty window size failed: {0}
    Resize(nix::Error),
}

/// A console socket waiting for libcontainer's pty master.
pub struct ConsoleSocket {
    pub path: PathBuf,
    master: mpsc::Receiver<OwnedFd>,
}

impl ConsoleSocket {
    pub fn bind(dir: &Path, name: &str) -> Result<Self, ConsoleError> {
        let path = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| ConsoleError::Bind {
            path: path.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("console".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Some(fd) = listener.accept().ok().and_then(|(s, _)| receive_fd(&s)) {
                    let _ = tx.send(fd);
                }
            })
            .map_err(|source| ConsoleError::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, master: rx })
    }

    /// The pty master, once libcontainer has sent it.
    pub fn master(self) -> Result<OwnedFd, ConsoleError> {
        let master = self
            .master
            .recv_timeout(MASTER_TIMEOUT)
            .map_err(|_| ConsoleError::NoMaster);
        let _ = std::fs::remove_file(&self.path);
        master
    }
}

fn receive_fd(stream: &std::os::unix::net::UnixStream) -> Option<OwnedFd> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let fd = *fds.first()?;
            // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we own it.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    None
}

/// Listens on a new port and relays the pty both ways once the host connects. Returns
/// the port and a descriptor of the master kept for resizing.
pub fn start_pty_relay(
    transport: &dyn Transport,
    ports: &PortAllocator,
    master: OwnedFd,
) -> Result<(u32, OwnedFd), ConsoleError> {
    let port = ports.next();
    let listener: Listener = transport.listen(port)?;
    let for_resize = master.try_clone().map_err(|e| ConsoleError::Bind {
        path: "pty".into(),
        source: e,
    })?;
    spawn_relay("pty", listener, move |stream| {
        let (Ok(mut to_host), Ok(input)) = (stream.try_clone(), master.try_clone()) else {
            return;
        };
        let mut from_host = stream;
        let mut input = File::from(input);
        let _ = thread::Builder::new()
            .name("pty-in".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = copy(&mut from_host, &mut input);
            });
        // Reading the master fails with EIO once every slave is closed: the end of output.
        let mut output = File::from(master);
        let _ = copy(&mut output, &mut to_host);
        to_host.shutdown_write();
    });
    Ok((port, for_resize))
}

/// Sets the window size the process sees (and sends it SIGWINCH).
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> Result<(), ConsoleError> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which lives for the whole call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(ConsoleError::Resize(nix::Error::last()));
    }
    Ok(())
}
