//! The ready pipe: a child process (the daemon, an exec helper) tells the command that
//! started it that the container or process exists (`ok PID`), or why not
//! (`err MESSAGE`). End of file without either means the child died; the caller then
//! points at the child's log.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Errors of the ready pipe.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ReadyError {
    /// creating the ready pipe failed: {0}
    Pipe(nix::Error),
    /// reading the ready pipe failed: {0}
    Read(std::io::Error),
    /// {0}
    Failed(String),
    /// the {what} exited before it was ready (see {log})
    Died { what: &'static str, log: String },
    /// the {what} was not ready after {secs} s (see {log})
    Timeout {
        what: &'static str,
        secs: u64,
        log: String,
    },
    /// --ready-fd {0} is not an open pipe: this command is internal, started by `husk create`/`exec`
    BadFd(RawFd),
}

/// The parent's end.
pub struct ReadyReader {
    file: File,
}

/// The child's end.
pub struct ReadyWriter {
    file: File,
}

/// Makes a pipe; both ends close on exec until [`pass_to`] hands the writer to a child.
pub fn pipe() -> Result<(ReadyReader, OwnedFd), ReadyError> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ReadyError::Pipe)?;
    Ok((
        ReadyReader {
            file: File::from(read),
        },
        write,
    ))
}

/// Lets `command`'s child inherit `fd` (same number) while every other process the
/// caller may spawn meanwhile does not.
pub fn pass_to(command: &mut Command, fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    let clear_cloexec = move || {
        // SAFETY: fcntl on an fd number with F_SETFD touches no memory; it is
        // async-signal-safe, as code between fork and exec must be.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl
    // (see above); it allocates nothing and touches no state shared with the parent.
    unsafe {
        command.pre_exec(clear_cloexec);
    }
}

impl ReadyReader {
    /// Waits for the child's word. `what` and `log` go into the errors.
    pub fn wait(
        mut self,
        timeout: Duration,
        what: &'static str,
        log: &std::path::Path,
    ) -> Result<i32, ReadyError> {
        let deadline = Instant::now() + timeout;
        let mut text = Vec::new();
        let log = log.display().to_string();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis().min(60_000)).unwrap_or(u16::MAX);
            if left.is_zero() {
                return Err(ReadyError::Timeout {
                    what,
                    secs: timeout.as_secs(),
                    log,
                });
            }
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(ReadyError::Read(e.into())),
            }
            let mut buf = [0u8; 4096];
            let n = self.file.read(&mut buf).map_err(ReadyError::Read)?;
            if n == 0 {
                return parse(&text).unwrap_or(Err(ReadyError::Died { what, log }));
            }
            text.extend_from_slice(&buf[..n]);
            if let Some(result) = parse(&text) {
                return result;
            }
        }
    }
}

/// A complete message, or None while the line is not finished.
fn parse(text: &[u8]) -> Option<Result<i32, ReadyError>> {
    let line = text
        .split(|b| *b == b'\n')
        .next()
        .filter(|_| text.contains(&b'\n'))?;
    let line = String::from_utf8_lossy(line);
    if let Some(pid) = line.strip_prefix("ok ") {
        return Some(
            pid.trim()
                .parse()
                .map_err(|_| ReadyError::Failed(format!("bad ready message {line:?}"))),
        );
    }
    let msg = line.strip_prefix("err ").unwrap_or(&line);
    Some(Err(ReadyError::Failed(msg.replace('\u{1f}', "\n"))))
}

impl ReadyWriter {
    /// Takes over `--ready-fd`.
    pub fn from_raw(fd: RawFd) -> Result<Self, ReadyError> {
        fcntl(fd, FcntlArg::F_GETFD).map_err(|_| ReadyError::BadFd(fd))?;
        // It must not leak into the processes the daemon starts (agent, virtiofsd).
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        // SAFETY: the fd is open (checked above), was passed to us for this purpose
        // alone, and nothing else in this process owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file })
    }

    /// The write end of a [`pipe`] kept by this process (a jail's launcher hands it to
    /// the jailed vmm across the fork).
    pub fn from_file(file: File) -> Self {
        Self { file }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn ok(mut self, pid: i32) {
        let _ = writeln!(self.file, "ok {pid}");
    }

    pub fn err(mut self, msg: &str) {
        let _ = writeln!(self.file, "err {}", msg.replace('\n', "\u{1f}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_err_and_death_are_told_apart() {
        let log = std::path::Path::new("/x.log");
        let (r, w) = pipe().unwrap();
        ReadyWriter {
            file: File::from(w),
        }
        .ok(42);
        assert_eq!(r.wait(Duration::from_secs(5), "daemon", log).unwrap(), 42);
        let (r, w) = pipe().unwrap();
        ReadyWriter {
            file: File::from(w),
        }
        .err("no kernel\nat /k");
        let e = r.wait(Duration::from_secs(5), "daemon", log).unwrap_err();
        assert_eq!(e.to_string(), "no kernel\nat /k");
        let (r, w) = pipe().unwrap();
        drop(w);
        let e = r.wait(Duration::from_secs(5), "daemon", log).unwrap_err();
        assert!(
            e.to_string()
                .contains("exited before it was ready (see /x.log)"),
            "{e}"
        );
        let (r, _w) = pipe().unwrap();
        let e = r
            .wait(Duration::from_millis(50), "daemon", log)
            .unwrap_err();
        assert!(matches!(e, ReadyError::Timeout { .. }), "{e}");
        assert!(ReadyWriter::from_raw(9999).is_err());
    }
}
