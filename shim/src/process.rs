//! One process the shim answers for (a container's init or an exec): its pid, its exit,
//! and the thread that waits for it.
//!
//! The shim is a child subreaper: the container processes libcontainer double-forks, and
//! the `husk vmm` daemon, are reparented to it, so it can `waitpid` each pid it owns.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::stdio::Io;

/// Exit status containerd reports when the shim could not learn the real one.
const UNKNOWN_EXIT: u32 = 255;

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The status, or 128 + the signal, as a shell reports it.
    pub code: u32,
    pub at: SystemTime,
}

/// Where a process is in its life, as far as the shim knows.
#[derive(Debug, Default)]
struct Life {
    pid: Option<i32>,
    exit: Option<Exit>,
}

/// A process and its stdio.
pub struct Process {
    life: Mutex<Life>,
    exited: Condvar,
    /// The stdio the shim relays or holds for the process (stdin pipe, pty master).
    pub io: Mutex<Io>,
}

impl Process {
    pub fn new(io: Io) -> Arc<Self> {
        Arc::new(Process {
            life: Mutex::new(Life::default()),
            exited: Condvar::new(),
            io: Mutex::new(io),
        })
    }

    fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> Option<i32> {
        self.life().pid
    }

    pub fn exit(&self) -> Option<Exit> {
        self.life().exit
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut life = self.life();
        loop {
            if let Some(exit) = life.exit {
                return exit;
            }
            life = self.exited.wait(life).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records that the process never ran (create or start failed), so waiters return.
    pub fn set_exited(&self, code: u32) {
        let mut life = self.life();
        if life.exit.is_none() {
            life.exit = Some(Exit {
                code,
                at: SystemTime::now(),
            });
        }
        self.exited.notify_all();
    }

    /// Records the pid and starts a thread that waits for it; `on_exit` runs once it has
    /// exited and its exit is recorded.
    pub fn watch(self: &Arc<Self>, pid: i32, on_exit: impl FnOnce(i32, Exit) + Send + 'static) {
        self.life().pid = Some(pid);
        let process = Arc::clone(self);
        std::thread::spawn(move || {
            let code = wait_for(pid);
            let exit = {
                let mut life = process.life();
                let exit = *life.exit.get_or_insert(Exit {
                    code,
                    at: SystemTime::now(),
                });
                process.exited.notify_all();
                exit
            };
            process.io.lock().unwrap_or_else(|e| e.into_inner()).close();
            on_exit(pid, exit);
        });
    }
}

/// Waits for `pid` and returns its exit code. A pid that is not (or not yet) the shim's
/// child is polled until it is gone; its status is then unknown.
fn wait_for(pid: i32) -> u32 {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code as u32,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as u32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
                    log::warn!(
                        "pid {pid} is gone and was not the shim's child: exit status unknown"
                    );
                    return UNKNOWN_EXIT;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                log::warn!("waiting for pid {pid}: {e}: exit status unknown");
                return UNKNOWN_EXIT;
            }
        }
    }
}
