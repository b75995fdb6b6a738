//! The stdio containerd hands a task: paths of FIFOs it made (or `file://` paths, or
//! nothing). stdout and stderr go straight to the process; stdin goes through a pipe the
//! shim feeds, so that `CloseIO` can close the process's stdin.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use husk::sandbox::Stdio;

/// Errors opening a task's stdio.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StdioError {
    /// opening the task's {what} {path:?} failed: {source}
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the task's {what} {uri:?} is a logging binary (binary://), which husk does not run; use FIFOs or file://
    BinaryLogger { what: &'static str, uri: String },
    /// making the stdin pipe failed: {0}
    Pipe(nix::Error),
}

/// The stdio paths of a process, as containerd sent them.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// What the shim keeps of a process's stdio while it runs.
#[derive(Default)]
pub struct Io {
    /// The write end of the process's stdin pipe (or the pty master's input side).
    stdin: Option<Arc<Mutex<Option<File>>>>,
    /// The pty master, for `ResizePty`.
    pub pty: Option<Arc<OwnedFd>>,
}

impl Io {
    /// `CloseIO`: the process reads EOF on stdin once the shim's relay stops.
    pub fn close_stdin(&mut self) {
        if let Some(stdin) = self.stdin.take() {
            stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// The process has exited: release everything.
    pub fn close(&mut self) {
        self.close_stdin();
        self.pty = None;
    }
}

fn open_output(what: &'static str, uri: &str) -> Result<Option<OwnedFd>, StdioError> {
    if uri.is_empty() {
        return Ok(None);
    }
    if uri.starts_with("binary://") {
        return Err(StdioError::BinaryLogger {
            what,
            uri: uri.to_string(),
        });
    }
    let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
    let mut opts = OpenOptions::new();
    if uri.starts_with("file://") {
        opts.append(true).create(true);
    } else {
        // A FIFO opened read-write never blocks and never fails for want of a reader;
        // containerd's reader sees EOF once the process (the only other writer) exits.
        opts.read(true).write(true);
    }
    opts.open(&path)
        .map(|f| Some(f.into()))
        .map_err(|source| StdioError::Open { what, path, source })
}

fn dev_null(what: &'static str) -> Result<OwnedFd, StdioError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(Into::into)
        .map_err(|source| StdioError::Open {
            what,
            path: "/dev/null".into(),
            source,
        })
}

/// Copies what containerd writes into the stdin FIFO to `sink` until either side ends.
pub fn relay_stdin(fifo: PathBuf, sink: Arc<Mutex<Option<File>>>) {
    std::thread::spawn(move || {
        // Blocks until containerd opens the writing side.
        let Ok(mut source) = File::open(&fifo) else {
            log::warn!("opening stdin {fifo:?} failed");
            sink.lock().unwrap_or_else(|e| e.into_inner()).take();
            return;
        };
        let mut buf = [0u8; 8192];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            let written = sink.as_mut().map(|out| out.write_all(&buf[..n]).is_ok());
            if written != Some(true) {
                break;
            }
        }
        sink.lock().unwrap_or_else(|e| e.into_inner()).take();
    });
}

/// Opens the stdio of a process without a terminal. Unset streams read from and write
/// to /dev/null, never the shim's own.
pub fn open(paths: &Paths) -> Result<(Stdio, Io), StdioError> {
    let stdout = match open_output("stdout", &paths.stdout)? {
        Some(fd) => fd,
        None => dev_null("stdout")?,
    };
    let stderr = match open_output("stderr", &paths.stderr)? {
        Some(fd) => fd,
        None => dev_null("stderr")?,
    };
    let mut io = Io::default();
    let stdin = if paths.stdin.is_empty() {
        dev_null("stdin")?
    } else {
        let (read, write) = nix::unistd::pipe().map_err(StdioError::Pipe)?;
        let sink = Arc::new(Mutex::new(Some(File::from(write))));
        relay_stdin(PathBuf::from(&paths.stdin), Arc::clone(&sink));
        io.stdin = Some(sink);
        read
    };
    let stdio = Stdio {
        stdin: Some(Arc::new(stdin)),
        stdout: Some(Arc::new(stdout)),
        stderr: Some(Arc::new(stderr)),
    };
    Ok((stdio, io))
}

/// Stdio for a process with a terminal: only stdin is the shim's to close; output
/// comes from the pty master (tty.rs).
pub fn for_terminal(sink: Arc<Mutex<Option<File>>>, pty: Arc<OwnedFd>) -> Io {
    Io {
        stdin: Some(sink),
        pty: Some(pty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_loggers_are_refused_by_name_and_missing_files_named() {
        let err = open(&Paths {
            stdout: "binary:///usr/bin/logger".into(),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("stdout") && err.contains("file://"), "{err}");
        let err = open(&Paths {
            stderr: "/nonexistent/dir/fifo".into(),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("stderr") && err.contains("/nonexistent/dir/fifo"),
            "{err}"
        );
    }

    #[test]
    fn stdin_relays_until_close_io() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (stdio, mut io) = open(&Paths {
            stdin: fifo.to_string_lossy().into(),
            ..Default::default()
        })
        .unwrap();
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"hi\n").unwrap();
        let mut reader = File::from(stdio.stdin.unwrap().try_clone().unwrap());
        let mut buf = [0u8; 3];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi\n");
        io.close_stdin();
        let mut rest = Vec::new();
        // EOF although containerd's writer is still open: CloseIO closed the pipe.
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
