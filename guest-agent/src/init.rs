//! PID 1 duties: filesystems, hostname, loopback, the ready signal and power-off.
//! (Reaping is the reaper thread's job, see `reaper.rs`.)

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};

use husk_protocol::boot;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

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
    /// creating the mount point {target} failed: {source}
    MountPoint {
        target: &'static str,
        source: std::io::Error,
    },
    /// setting the guest hostname failed: {0}
    Hostname(nix::Error),
    /// bringing up the loopback interface failed (is CONFIG_NET in the guest kernel?): {0}
    Loopback(nix::Error),
    /// moving / onto a bind mount of the initramfs failed at {step}: {source}
    RootBind {
        step: &'static str,
        source: nix::Error,
    },
}

/// The guest's hostname; containers with a UTS namespace set their own from the spec.
const HOSTNAME: &str = "husk";

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
    FsMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::empty(),
    },
    FsMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::empty(),
    },
    FsMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::empty(),
    },
    FsMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::empty(),
    },
    FsMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::empty(),
    },
    // cgroup v2 only: the guest kernel is ours, and libcontainer manages v2 without systemd.
    FsMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: MsFlags::empty(),
    },
];

fn mount_base() -> Result<(), InitError> {
    for m in BASE_MOUNTS {
        std::fs::create_dir_all(m.target).map_err(|source| InitError::MountPoint {
            target: m.target,
            source,
        })?;
        let flags = m.flags | MsFlags::MS_NOSUID;
        mount(
            Some(m.source),
            m.target,
            Some(m.fstype),
            flags,
            None::<&str>,
        )
        .map_err(|source| InitError::Mount {
            target: m.target,
            fstype: m.fstype,
            source,
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
    port.write_all(&[boot::READY_MAGIC])
        .map_err(InitError::ReadySignal)
}

/// Ends the VM: with `reboot=k` the guest kernel resets through the i8042 controller,
/// which the VMM treats as the guest's power-off.
pub fn power_off() -> Result<(), InitError> {
    nix::unistd::sync();
    reboot(RebootMode::RB_AUTOBOOT).map_err(InitError::PowerOff)?;
    Ok(())
}

/// Brings `lo` up with one ioctl: cheaper here than a netlink conversation.
fn loopback_up() -> Result<(), InitError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(InitError::Loopback)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc < 0 {
        return Err(InitError::Loopback(nix::Error::last()));
    }
    Ok(())
}

/// The initramfs is the kernel's initial root mount, which has no parent, and
/// pivot_root(2) refuses to move such a root (EINVAL): every container's pivot_root
/// would fail. Stacking a bind mount of the initramfs on top of it and chrooting into
/// that gives a root with a parent, without copying a byte (cheaper here than switching
/// to a new tmpfs: each copied page costs emulated kernel time).
fn root_off_initramfs() -> Result<(), InitError> {
    use nix::unistd::{chdir, chroot};
    let err = |step| move |source| InitError::RootBind { step, source };
    const STAGE: &str = "/.husk-root";
    std::fs::create_dir_all(STAGE).map_err(|source| InitError::MountPoint {
        target: STAGE,
        source,
    })?;
    mount(
        Some("/"),
        STAGE,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err("bind / on /.husk-root"))?;
    chdir(STAGE).map_err(err("chdir /.husk-root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move the bind mount onto /"))?;
    chroot(".").map_err(err("chroot"))?;
    chdir("/").map_err(err("chdir /"))
}

/// Whether `/` is still the kernel's initial root (the unpacked initramfs, ramfs or
/// tmpfs) rather than a root disk the kernel mounted over it, which already has a parent.
fn root_is_initramfs() -> bool {
    use nix::sys::statfs::{statfs, FsType};
    /// `RAMFS_MAGIC` of linux/magic.h (libc does not export it).
    const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;
    let initial = [FsType(RAMFS_MAGIC), FsType(libc::TMPFS_MAGIC)];
    statfs("/").is_ok_and(|fs| initial.contains(&fs.filesystem_type()))
}

/// Everything PID 1 does before it can serve the host.
pub fn prepare_guest() -> Result<(), InitError> {
    if root_is_initramfs() {
        root_off_initramfs()?;
    }
    mount_base()?;
    nix::unistd::sethostname(HOSTNAME).map_err(InitError::Hostname)?;
    log(&crate::vector_state::report(
        crate::vector_state::inherited_tunables().as_deref(),
    ));
    loopback_up()
}

/// Tells whoever started us that the agent is ready: the VMM through the boot-timer port
/// when we are PID 1, a log line on the host.
pub fn ready() -> Result<(), InitError> {
    if std::process::id() == 1 {
        signal_ready()?;
        log("ready");
        if std::env::var_os(boot::ENV_POWEROFF_AFTER_READY).is_some_and(|v| v == "1") {
            power_off()?;
        }
    } else {
        log("ready");
    }
    Ok(())
}
