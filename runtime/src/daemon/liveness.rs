//! Is the daemon still alive? A pid alone is not enough: after the daemon exits its pid
//! can be reused, and an unreaped daemon is a zombie. `vmm.json` keeps the pid with its
//! start time (field 22 of `/proc/PID/stat`), which a reused pid will not match.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, DaemonError};

/// The daemon process as `create` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// The process's state letter and start time, or None when it does not exist.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 3.. follow; start time is field 22, the 20th after the state.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    /// Running (not a zombie) and the same process as recorded.
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, t)) if state != 'Z' && state != 'X' && t == self.start_time)
    }

    pub fn write(&self, path: &Path) -> Result<(), DaemonError> {
        let json = serde_json::to_vec(self).expect("two integers serialize");
        crate::oci::store::write_atomic(path, &json).map_err(|e| DaemonError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// None when the file is missing (create failed before the daemon was ready).
    pub fn read(path: &Path) -> Result<Option<Self>, DaemonError> {
        match std::fs::read(path) {
            Ok(text) => {
                serde_json::from_slice(&text)
                    .map(Some)
                    .map_err(|source| DaemonError::Config {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let id = ProcessId::of(pid).expect("an unreaped child has a /proc entry");
        // Exited but not reaped: a zombie. How soon `true` gets there depends on the
        // machine's load (a fixed 200 ms wait failed once in a CI run), so wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !matches!(stat(pid), Some(('Z', _))) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} did not exit: {:?}",
                stat(pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!id.alive(), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!id.alive(), "a reaped process is not alive");
    }
}
