//! PID 1 duties: filesystems, the ready signal, power-off and reaping.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};

use husk_protocol::boot;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Errors of the agent's init phase. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum InitError {
    /// mounting {target} ({fstype}) failed: {source}
    Mount {
        target: &'static str,
        fstype: &'static str,
        source: nix::Error,
    },
    /// writing the ready signal to /dev/port failed (is CONFIG_DEVPORT in the guest kernel?): {0}
    ReadySignal(std::io::Error),
    /// powering off failed: {0}
    PowerOff(nix::Error),
}

/// Writes one line to the console (PID 1's stderr is /dev/console).
pub fn log(msg: &str) {
    eprintln!("husk-agent: {msg}");
}

/// A panic in PID 1 must not be silent: print it, then let the kernel panic reboot the VM.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log(&format!("panic: {info}"));
    }));
}

struct FsMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
}

const BASE_MOUNTS: &[FsMount] = &[
    FsMount { source: "proc", target: "/proc", fstype: "proc", flags: MsFlags::empty() },
    FsMount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: MsFlags::empty() },
    FsMount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::empty() },
    FsMount { source: "tmpfs", target: "/tmp", fstype: "tmpfs", flags: MsFlags::empty() },
    FsMount { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: MsFlags::empty() },
];

fn mount_base() -> Result<(), InitError> {
    for m in BASE_MOUNTS {
        let flags = m.flags | MsFlags::MS_NOSUID;
        mount(Some(m.source), m.target, Some(m.fstype), flags, None::<&str>).map_err(|source| {
            InitError::Mount { target: m.target, fstype: m.fstype, source }
        })?;
    }
    Ok(())
}

fn signal_ready() -> Result<(), InitError> {
    let mut port = OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .map_err(InitError::ReadySignal)?;
    port.seek(SeekFrom::Start(u64::from(boot::READY_PORT)))
        .map_err(InitError::ReadySignal)?;
    port.write_all(&[boot::READY_MAGIC]).map_err(InitError::ReadySignal)
}

fn cmdline_has(key: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == key))
        .unwrap_or(false)
}

/// Ends the VM: with `reboot=k` the guest kernel resets through the i8042 controller,
/// which the VMM treats as the guest's power-off.
fn power_off() -> Result<(), InitError> {
    nix::unistd::sync();
    reboot(RebootMode::RB_AUTOBOOT).map_err(InitError::PowerOff)?;
    Ok(())
}

fn reap_forever() -> ! {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty())) {
            Ok(_) => {}
            // No children: nothing to reap until one appears; sleep instead of spinning.
            Err(_) => std::thread::sleep(std::time::Duration::from_secs(3600)),
        }
    }
}

pub fn run() -> Result<(), InitError> {
    mount_base()?;
    signal_ready()?;
    log("ready");
    if cmdline_has(boot::CMDLINE_POWEROFF_AFTER_READY) {
        power_off()?;
    }
    reap_forever()
}
