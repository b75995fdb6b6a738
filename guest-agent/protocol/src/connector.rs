//! How the host reaches one of the agent's ports.
//!
//! - [`UnixDirConnector`]: tier 2, the agent runs on the host and listens on Unix sockets
//!   named after the port in one directory (`DIR/1024`, ...).
//! - [`HybridVsockConnector`]: a real VM. The VMM's vsock device exposes the guest's ports
//!   through one Unix socket: connect, send `CONNECT <port>\n`, read `OK <host port>\n`
//!   (Firecracker's hybrid vsock convention), then the socket is the stream.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors reaching an agent port.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConnectError {
    /// connecting to {path} for port {port} failed (is the agent/VM running?): {source}
    Connect {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    /// hybrid vsock handshake for port {port} failed: {source}
    HandshakeIo { port: u32, source: io::Error },
    /// the VMM refused CONNECT {port}: it answered {reply:?} (is the agent listening on that port?)
    Refused { port: u32, reply: String },
}

/// Longest socket path connected to directly (`sun_path` holds 108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Connects to a Unix socket whose path may exceed `sun_path`: a jailed vmm's sockets sit
/// deep under `--root` (`<root>/<id>/vm/<id>/jail/run/`), and Docker's 64-character ids
/// push them past the limit. The directory is then opened with O_PATH and the socket
/// reached as `/proc/self/fd/N/<name>`, which is short whatever the directory.
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixStream::connect(path);
    };
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixStream::connect(path);
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    UnixStream::connect(PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

/// Opens a stream to one of the agent's ports.
pub trait Connector: Send + Sync {
    fn connect(&self, port: u32) -> Result<UnixStream, ConnectError>;
}

/// The agent on the host, listening in a directory (`husk-agent --unix-dir DIR`).
#[derive(Debug, Clone)]
pub struct UnixDirConnector {
    dir: PathBuf,
}

impl UnixDirConnector {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The socket path for `port`; the agent's `UnixTransport` uses the same naming.
    pub fn socket_path(dir: &Path, port: u32) -> PathBuf {
        dir.join(port.to_string())
    }
}

impl Connector for UnixDirConnector {
    fn connect(&self, port: u32) -> Result<UnixStream, ConnectError> {
        let path = Self::socket_path(&self.dir, port);
        connect_unix(&path).map_err(|source| ConnectError::Connect { path, port, source })
    }
}

/// The agent in a VM, through the VMM's hybrid vsock Unix socket.
#[derive(Debug, Clone)]
pub struct HybridVsockConnector {
    uds_path: PathBuf,
    /// How long to wait for the `OK` line (the guest may be slow to accept).
    reply_timeout: Duration,
}

impl HybridVsockConnector {
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        Self {
            uds_path: uds_path.into(),
            reply_timeout: Duration::from_secs(60),
        }
    }

    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }
}

impl Connector for HybridVsockConnector {
    fn connect(&self, port: u32) -> Result<UnixStream, ConnectError> {
        let mut stream = connect_unix(&self.uds_path).map_err(|source| ConnectError::Connect {
            path: self.uds_path.clone(),
            port,
            source,
        })?;
        let io_err = |source| ConnectError::HandshakeIo { port, source };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(io_err)?;
        stream
            .set_read_timeout(Some(self.reply_timeout))
            .map_err(io_err)?;
        let reply = read_line(&mut stream).map_err(io_err)?;
        stream.set_read_timeout(None).map_err(io_err)?;
        match reply.strip_prefix("OK ") {
            Some(host_port) if host_port.trim().parse::<u32>().is_ok() => Ok(stream),
            _ => Err(ConnectError::Refused { port, reply }),
        }
    }
}

/// Reads up to and without the `\n`, one byte at a time: the bytes after it belong to
/// the stream's user, so nothing may be read ahead.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    const MAX_LINE: usize = 64;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_LINE {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    #[test]
    fn a_socket_path_longer_than_sun_path_is_reached_through_its_directory() {
        let root = std::env::temp_dir().join(format!("husk-long-{}", std::process::id()));
        let dir = root.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        assert!(path.as_os_str().len() > SUN_PATH_MAX);
        // The listener binds through the same kind of short path.
        let held = std::fs::File::open(&dir).unwrap();
        let listener = UnixListener::bind(
            PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd())).join("control.sock"),
        )
        .unwrap();
        let client = thread::spawn(move || connect_unix(&path).map(drop));
        listener.accept().unwrap();
        client.join().unwrap().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A stand-in for the VMM's hybrid vsock socket: reads the CONNECT line, answers
    /// `reply`, then echoes one line so we can check the stream carries data after it.
    fn fake_vmm(dir: &Path, reply: &'static str) -> (PathBuf, thread::JoinHandle<String>) {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut connect = String::new();
            reader.read_line(&mut connect).unwrap();
            (&stream).write_all(reply.as_bytes()).unwrap();
            let mut echo = String::new();
            if reader.read_line(&mut echo).unwrap_or(0) > 0 {
                (&stream).write_all(echo.as_bytes()).unwrap();
            }
            connect
        });
        (path, handle)
    }

    #[test]
    fn hybrid_vsock_sends_connect_and_hands_over_the_stream() {
        let dir = tempdir();
        let (path, vmm) = fake_vmm(&dir, "OK 52000\n");
        let mut stream = HybridVsockConnector::new(&path).connect(1024).unwrap();
        stream.write_all(b"ping\n").unwrap();
        let mut echo = String::new();
        BufReader::new(&stream).read_line(&mut echo).unwrap();
        assert_eq!(echo, "ping\n");
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hybrid_vsock_refusal_names_the_port_and_reply() {
        let dir = tempdir();
        let (path, vmm) = fake_vmm(&dir, "NO\n");
        let err = HybridVsockConnector::new(&path).connect(1030).unwrap_err();
        assert!(
            matches!(&err, ConnectError::Refused { port: 1030, reply } if reply == "NO"),
            "{err}"
        );
        drop(vmm);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unix_dir_connect_error_names_the_socket() {
        let dir = tempdir();
        let err = UnixDirConnector::new(&dir).connect(1024).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.join("1024").display().to_string()),
            "{msg}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-protocol-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
