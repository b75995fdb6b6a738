//! A process's stdin/stdout/stderr: pipes on the process side, one listening port per
//! stream on the host side, and a relay thread per stream that accepts the host's
//! connection and copies until end of file.
//!
//! Set-up is two-phase: [`PipeStdio::prepare`] makes pipes and listeners without starting
//! anything, so a failed container build drops them all (and removes the sockets);
//! [`PipeStdio::start_relays`] runs only once the process exists.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::thread;

use husk_protocol::messages::{StdioPorts, StdioRequest};
use nix::fcntl::OFlag;
use nix::unistd::pipe2;

use crate::ports::PortAllocator;
use crate::transport::{Listener, Stream, Transport, TransportError};

/// Errors preparing a process's streams.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StdioError {
    /// creating a pipe for the process's stdio failed (too many open files?): {0}
    Pipe(nix::Error),
    /// opening /dev/null for a process without stdin failed: {0}
    DevNull(io::Error),
    /// {0}
    Listen(#[from] TransportError),
}

/// The ends the process gets (moved into libcontainer's builder).
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends and the listeners, waiting for the process to exist.
pub struct PipeStdio {
    pub ports: StdioPorts,
    stdin: Option<(Listener, OwnedFd)>,
    stdout: (Listener, OwnedFd),
    stderr: (Listener, OwnedFd),
}

impl PipeStdio {
    pub fn prepare(
        transport: &dyn Transport,
        ports: &PortAllocator,
        request: StdioRequest,
    ) -> Result<(PipeStdio, ChildStdio), StdioError> {
        let listen = || -> Result<(u32, Listener), TransportError> {
            let port = ports.next();
            Ok((port, transport.listen(port)?))
        };
        let (stdin_port, stdin, child_stdin) = if request.stdin {
            let (read, write) = pipe()?;
            let (port, listener) = listen()?;
            (Some(port), Some((listener, write)), read)
        } else {
            let null = File::open("/dev/null").map_err(StdioError::DevNull)?;
            (None, None, OwnedFd::from(null))
        };
        let (out_read, out_write) = pipe()?;
        let (out_port, out_listener) = listen()?;
        let (err_read, err_write) = pipe()?;
        let (err_port, err_listener) = listen()?;
        let ours = PipeStdio {
            ports: StdioPorts {
                stdin: stdin_port,
                stdout: Some(out_port),
                stderr: Some(err_port),
                pty: None,
            },
            stdin,
            stdout: (out_listener, out_read),
            stderr: (err_listener, err_read),
        };
        let child = ChildStdio {
            stdin: child_stdin,
            stdout: out_write,
            stderr: err_write,
        };
        Ok((ours, child))
    }

    /// Starts one relay thread per stream. They end at end of file on their source.
    pub fn start_relays(self) {
        if let Some((listener, pipe)) = self.stdin {
            spawn_relay("stdin", listener, move |mut stream| {
                let mut pipe = File::from(pipe);
                let _ = copy(&mut stream, &mut pipe);
                // Dropping the pipe's write end gives the process end of file.
            });
        }
        for (name, (listener, pipe)) in [("stdout", self.stdout), ("stderr", self.stderr)] {
            spawn_relay(name, listener, move |mut stream| {
                let mut pipe = File::from(pipe);
                let _ = copy(&mut pipe, &mut stream);
                stream.shutdown_write();
            });
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    // CLOEXEC: a concurrently spawned process must not inherit our ends, or this
    // process's reader would never see end of file.
    pipe2(OFlag::O_CLOEXEC).map_err(StdioError::Pipe)
}

/// Accepts the host's one connection on `listener`, then runs `relay` on it.
pub fn spawn_relay<F>(name: &'static str, listener: Listener, relay: F)
where
    F: FnOnce(Stream) + Send + 'static,
{
    let spawned = thread::Builder::new()
        .name(format!("relay-{name}"))
        .stack_size(128 * 1024)
        .spawn(move || match listener.accept() {
            Ok(stream) => {
                drop(listener);
                relay(stream);
            }
            Err(e) => crate::init::log(&format!("accepting the {name} stream failed: {e}")),
        });
    if let Err(e) = spawned {
        crate::init::log(&format!("starting the {name} relay failed: {e}"));
    }
}

/// Copies until end of file with a buffer on the stack: no allocation, so relays never
/// contend with a spawn for the allocator's locks.
pub fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = [0u8; 32 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}
