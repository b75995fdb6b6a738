//! Where the agent's sockets come from: AF_VSOCK in the guest, Unix sockets in a
//! directory on the host (tier-2 tests). Everything above this module sees only
//! [`Listener`] and [`Stream`], so the same server code runs in both places.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use husk_protocol::connector::UnixDirConnector;
use nix::sys::socket::{
    accept4, bind, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    VsockAddr,
};

/// Errors creating a listening socket.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TransportError {
    /// listening on vsock port {port} failed (is CONFIG_VIRTIO_VSOCKETS in the guest kernel and the VMM's vsock device attached?): {source}
    Vsock { port: u32, source: nix::Error },
    /// listening on {path} failed (does the directory exist and is the port free?): {source}
    Unix { path: PathBuf, source: io::Error },
}

/// Makes listening sockets for agent ports. Swapped in tests and on the host.
pub trait Transport: Send + Sync {
    fn listen(&self, port: u32) -> Result<Listener, TransportError>;
}

/// AF_VSOCK in the guest: the host reaches port N through the VMM's vsock device.
pub struct VsockTransport;

impl Transport for VsockTransport {
    fn listen(&self, port: u32) -> Result<Listener, TransportError> {
        let err = |source| TransportError::Vsock { port, source };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err)?;
        listen(&fd, Backlog::new(16).map_err(err)?).map_err(err)?;
        Ok(Listener { fd, path: None })
    }
}

/// Unix sockets named after the port in one directory (`DIR/1024`), the layout
/// [`UnixDirConnector`] connects to.
pub struct UnixTransport {
    dir: PathBuf,
}

impl UnixTransport {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl Transport for UnixTransport {
    fn listen(&self, port: u32) -> Result<Listener, TransportError> {
        let path = UnixDirConnector::socket_path(&self.dir, port);
        let listener = UnixListener::bind(&path).map_err(|source| TransportError::Unix {
            path: path.clone(),
            source,
        })?;
        Ok(Listener {
            fd: listener.into(),
            path: Some(path),
        })
    }
}

/// A listening socket. A Unix socket's file is removed when it is dropped.
pub struct Listener {
    fd: OwnedFd,
    path: Option<PathBuf>,
}

impl Listener {
    pub fn accept(&self) -> io::Result<Stream> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    return Ok(Stream(fd));
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected stream socket of either family.
pub struct Stream(OwnedFd);

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream(self.0.try_clone()?))
    }

    /// Tells the peer no more data follows (its reads see end of file).
    pub fn shutdown_write(&self) {
        let _ = shutdown(self.0.as_raw_fd(), Shutdown::Write);
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.0.as_raw_fd(), buf) {
                Err(nix::Error::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::write(&self.0, buf) {
                Err(nix::Error::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
