//! The one place that reaps children, so that zombie reaping (PID 1's duty) does not
//! steal the exit statuses the agent reports to the host.
//!
//! libcontainer waits for its own helper ("intermediate") process with `waitpid(pid)`
//! while it builds a container. A `waitpid(-1)` running at the same time could reap that
//! helper first and break the build. So spawns hold [`Reaper::spawn_guard`], and the
//! reaper thread, woken by a `waitid(WNOWAIT)` that only peeks, takes the same lock before
//! it reaps anything. Spawns also register their pid under that lock, so no exit can be
//! reaped before someone is known to want it.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use husk_protocol::ExitStatus;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

#[derive(Default)]
struct Table {
    /// Pids whose exit status someone will ask for.
    watched: HashSet<Pid>,
    /// Exit statuses of watched pids, kept until [`Reaper::forget`].
    exited: HashMap<Pid, ExitStatus>,
    /// Bumped on every spawn, so the reaper thread can sleep while there are no children.
    spawns: u64,
}

#[derive(Default)]
pub struct Reaper {
    spawn_lock: Mutex<()>,
    table: Mutex<Table>,
    changed: Condvar,
}

/// Held while libcontainer creates processes; see the module docs.
pub struct SpawnGuard<'a> {
    reaper: &'a Reaper,
    _lock: MutexGuard<'a, ()>,
}

impl SpawnGuard<'_> {
    /// Records that `pid` (a child of the agent) will be waited for.
    pub fn watch(&self, pid: Pid) {
        self.reaper.table().watched.insert(pid);
    }
}

impl Drop for SpawnGuard<'_> {
    fn drop(&mut self) {
        self.reaper.table().spawns += 1;
        self.reaper.changed.notify_all();
    }
}

impl Reaper {
    pub fn spawn_guard(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            reaper: self,
            _lock: self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until `pid` has exited, or `timeout` passes (then `None`).
    pub fn wait(&self, pid: Pid, timeout: Option<Duration>) -> Option<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut table = self.table();
        loop {
            if let Some(status) = table.exited.get(&pid) {
                return Some(*status);
            }
            table = match deadline {
                None => self.changed.wait(table).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.changed
                        .wait_timeout(table, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The status if `pid` has exited, without blocking.
    pub fn try_status(&self, pid: Pid) -> Option<ExitStatus> {
        self.table().exited.get(&pid).copied()
    }

    /// Drops what is known about `pid` once nobody will ask again.
    pub fn forget(&self, pid: Pid) {
        let mut table = self.table();
        table.watched.remove(&pid);
        table.exited.remove(&pid);
    }

    /// The reaper thread's body.
    pub fn run(&self) -> ! {
        loop {
            let spawns = self.table().spawns;
            // Peek: block until some child is a zombie, without reaping it.
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => self.reap_all(),
                Err(nix::Error::EINTR) => {}
                // No children at all: sleep until the next spawn instead of spinning.
                Err(_) => {
                    let table = self.table();
                    let _unused = self
                        .changed
                        .wait_while(table, |t| t.spawns == spawns)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    fn reap_all(&self) {
        let _no_spawns = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    (pid, ExitStatus::Signaled(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            let mut table = self.table();
            if table.watched.contains(&pid) {
                table.exited.insert(pid, status);
                self.changed.notify_all();
            }
        }
    }
}
