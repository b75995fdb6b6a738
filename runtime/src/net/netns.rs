//! A network namespace named by a path (`/var/run/netns/NAME`, `/proc/PID/ns/net`), and
//! how to run code or a command inside it.
//!
//! `setns` changes only the calling thread, so code runs on a short-lived thread that
//! joins the namespace and ends with the work; the caller's threads never move. Commands
//! join it between fork and exec.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `NS_GET_NSTYPE` (linux/nsfs.h): `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Errors opening or entering a network namespace.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetnsError {
    /// network namespace {0} does not exist; check the path in the spec's linux.namespaces
    Missing(PathBuf),
    /// cannot open network namespace {path}: {source}
    Open { path: PathBuf, source: io::Error },
    /// {0} is not a network namespace (linux.namespaces type network must name one)
    NotNetns(PathBuf),
    /// cannot enter network namespace {path}: {source}
    Enter { path: PathBuf, source: io::Error },
    /// cannot start a thread to enter network namespace {path}: {source}
    Thread { path: PathBuf, source: io::Error },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` and checks that it is a network namespace.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NetnsError::Missing(path.to_owned()),
            _ => NetnsError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        // SAFETY: NS_GET_NSTYPE takes no argument; on a file that is not a namespace it
        // fails with ENOTTY.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns(path.to_owned()));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread inside the namespace and returns what it returns. Fds
    /// opened by `f` (sockets, taps) stay bound to the namespace after the thread ends.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(scope, || {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |e| NetnsError::Enter {
                            path: self.path.clone(),
                            source: e.into(),
                        },
                    )?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let fd = self.file.as_raw_fd();
        let join = move || {
            // SAFETY: setns(2) on an fd we own; it is async-signal-safe, so it may run
            // between fork and exec.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setns(2); `fd` stays open in the child until exec (CLOEXEC acts only at exec).
        unsafe {
            command.pre_exec(join);
        }
        command
    }
}
