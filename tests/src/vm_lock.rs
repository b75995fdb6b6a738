//! `/tmp/husk-vm.lock`: one real guest boots at a time on a shared machine (2 cores).
//!
//! Tests that boot guests take the lock themselves, unless an ancestor already holds it
//! (`flock /tmp/husk-vm.lock cargo test ...`): taking it again through a new open file
//! would wait for that ancestor forever.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const VM_LOCK: &str = "/tmp/husk-vm.lock";
/// Other engineers' guests may hold it for many minutes (`flock -w 900`).
const WAIT: Duration = Duration::from_secs(900);

/// Held until dropped (`None`: an ancestor holds it for us).
#[must_use = "the lock is released when this is dropped"]
pub struct VmLock(#[allow(dead_code)] Option<File>);

/// Takes the VM lock, waiting up to 15 minutes; panics if it cannot.
pub fn hold() -> VmLock {
    let file = File::options()
        .create(true)
        .append(true)
        .open(VM_LOCK)
        .unwrap_or_else(|e| panic!("opening {VM_LOCK}: {e}"));
    let meta = file.metadata().expect("lock file metadata");
    if held_by_ancestor(meta.dev(), meta.ino()) {
        return VmLock(None);
    }
    // A blocking flock queues with the `flock -w 900` waiters (polling with LOCK_NB would
    // lose to them every time). It runs on a helper thread so the wait can time out; a
    // helper that gets the lock after that finds nobody to hand it to and drops it.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: flock on a valid open fd; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        let _ = tx.send((rc == 0).then_some(file));
    });
    let start = Instant::now();
    let got = match rx.recv_timeout(Duration::from_secs(1)) {
        Ok(got) => got,
        Err(_) => {
            eprintln!("waiting for {VM_LOCK} (another guest is running)");
            let got = rx
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("{VM_LOCK} still held by another guest after {WAIT:?}"));
            eprintln!("got {VM_LOCK} after {:.0?}", start.elapsed());
            got
        }
    };
    VmLock(Some(
        got.unwrap_or_else(|| panic!("flock {VM_LOCK} failed")),
    ))
}

/// Whether `/proc/locks` shows a flock on (dev, ino) held by this process's ancestors.
fn held_by_ancestor(dev: u64, ino: u64) -> bool {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return false;
    };
    let ancestors = ancestors();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF" ("->" marks waiters).
        f.len() >= 6
            && f[1] == "FLOCK"
            && f[4]
                .parse::<i32>()
                .is_ok_and(|pid| ancestors.contains(&pid))
            && f[5] == want
    })
}

fn ancestors() -> Vec<i32> {
    let mut out = Vec::new();
    let mut pid = std::process::id() as i32;
    while pid > 1 {
        out.push(pid);
        pid = parent(pid).unwrap_or(0);
    }
    out
}

fn parent(pid: i32) -> Option<i32> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // "PID (comm) S PPID ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
