//! Processes with a terminal: the sandbox sends the pty master to a console socket the
//! shim listens on; the shim relays the stdin FIFO into the master and the master into
//! the stdout FIFO, and `ResizePty` sets the master's window size.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::stdio::{self, Io, Paths};

/// How long the sandbox has to send the pty master after create returned.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors setting up a terminal.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TtyError {
    /// console socket {path:?}: {op} failed: {source}
    Socket {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// console socket {0:?}: no pty master arrived within 30 s (the process has a terminal but the sandbox sent none)
    NoMaster(PathBuf),
    /// opening the terminal's stdout {path:?} failed: {source}
    Stdout {
        path: PathBuf,
        source: std::io::Error,
    },
    /// setting the window size to {width}x{height} failed: {source}
    Resize {
        width: u32,
        height: u32,
        source: std::io::Error,
    },
}

/// A listening console socket in the bundle; removed when dropped.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(dir: &Path, name: &str) -> Result<Self, TtyError> {
        let path = dir.join(format!("{name}.console.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| TtyError::Socket {
            path: path.clone(),
            op: "bind",
            source,
        })?;
        Ok(ConsoleSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> TtyError + '_ {
        move |source| TtyError::Socket {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Accepts the sandbox's connection and takes the pty master it sends.
    pub fn receive(&self) -> Result<OwnedFd, TtyError> {
        self.listener
            .set_nonblocking(true)
            .map_err(self.err("set_nonblocking"))?;
        let deadline = Instant::now() + RECEIVE_TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(TtyError::NoMaster(self.path.clone()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(self.err("accept")(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(self.err("set_blocking"))?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| self.err("recvmsg")(e.into()))?;
        for c in msg.cmsgs().map_err(|e| self.err("recvmsg")(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed this fd in our table; nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(TtyError::NoMaster(self.path.clone()))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts relaying between the FIFOs and the pty master; returns what `CloseIO` and
/// `ResizePty` need.
pub fn relay(master: OwnedFd, paths: &Paths) -> Result<Io, TtyError> {
    let master = Arc::new(master);
    let to_master = master.try_clone().map_err(|source| TtyError::Stdout {
        path: "pty master".into(),
        source,
    })?;
    let sink = Arc::new(Mutex::new(Some(File::from(to_master))));
    if !paths.stdin.is_empty() {
        stdio::relay_stdin(PathBuf::from(&paths.stdin), Arc::clone(&sink));
    }
    if !paths.stdout.is_empty() {
        let path = PathBuf::from(&paths.stdout);
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| TtyError::Stdout { path, source })?;
        let mut from = File::from(master.try_clone().map_err(|source| TtyError::Stdout {
            path: "pty master".into(),
            source,
        })?);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // Ends with EIO once the last process holding the pty slave has exited.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(stdio::for_terminal(sink, master))
}

/// Sets the terminal's window size.
pub fn resize(master: &OwnedFd, width: u32, height: u32) -> Result<(), TtyError> {
    let size = libc::winsize {
        ws_row: height.min(u16::MAX as u32) as u16,
        ws_col: width.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(TtyError::Resize {
            width,
            height,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
