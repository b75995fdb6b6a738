//! The privileged system calls the jailer makes, behind a narrow trait so the jail logic
//! (order of steps, paths, values, cleanup on failure) is unit-tested without root.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::Pid;

/// A resource limit the jailer sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    NoFile,
    NProc,
    Core,
}

impl Rlimit {
    fn resource(self) -> libc::__rlimit_resource_t {
        match self {
            Rlimit::NoFile => libc::RLIMIT_NOFILE,
            Rlimit::NProc => libc::RLIMIT_NPROC,
            Rlimit::Core => libc::RLIMIT_CORE,
        }
    }
}

/// What the jailer asks of the kernel. Each method is one step that either happens or
/// fails with the kernel's error.
pub trait Sys {
    /// Threads of the calling process (unshare and fork need a single-threaded caller).
    fn thread_count(&self) -> io::Result<usize>;
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()>;
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Hard-links `from` to `to`, copying when they are on different filesystems.
    fn link_or_copy(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()>;
    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn unshare(&self, flags: CloneFlags) -> io::Result<()>;
    /// `Some(child)` in the parent, `None` in the child.
    fn fork(&self) -> io::Result<Option<Pid>>;
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()>;
    fn umount(&self, target: &Path, flags: MntFlags) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    /// (soft, hard)
    fn getrlimit(&self, which: Rlimit) -> io::Result<(u64, u64)>;
    fn setrlimit(&self, which: Rlimit, soft: u64, hard: u64) -> io::Result<()>;
    /// Closes every fd not in `keep`.
    fn close_fds_except(&self, keep: &[RawFd]) -> io::Result<()>;
    /// Highest capability number the kernel knows.
    fn last_cap(&self) -> io::Result<u32>;
    fn drop_bounding_cap(&self, cap: u32) -> io::Result<()>;
    fn clear_ambient_caps(&self) -> io::Result<()>;
    /// setgroups([]), setresgid(gid), setresuid(uid), in that order.
    fn set_ids(&self, uid: u32, gid: u32) -> io::Result<()>;
    /// Empties the effective, permitted and inheritable sets.
    fn clear_caps(&self) -> io::Result<()>;
    fn set_not_dumpable(&self) -> io::Result<()>;
    fn set_no_new_privs(&self) -> io::Result<()>;
}

/// The real kernel.
pub struct RealSys;

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl Sys for RealSys {
    fn thread_count(&self) -> io::Result<usize> {
        Ok(std::fs::read_dir("/proc/self/task")?.count())
    }
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().mode(mode).create(path)?;
        // The umask may have taken bits away; the jail's modes are deliberate.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }
    fn link_or_copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        // The file itself, never a symlink to it: link(2) would link the symlink, whose
        // target is out of the jail's reach (the build output links to a cache).
        let from = std::fs::canonicalize(from)?;
        match std::fs::hard_link(&from, to) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => std::fs::copy(&from, to).map(drop),
            other => other,
        }
    }
    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        std::fs::write(path, contents)
    }
    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(major, minor),
        )
        .map_err(errno)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }
    fn unshare(&self, flags: CloneFlags) -> io::Result<()> {
        nix::sched::unshare(flags).map_err(errno)
    }
    fn fork(&self) -> io::Result<Option<Pid>> {
        // SAFETY: `Jail::enter` checked the process is single-threaded, so the child
        // cannot inherit a lock held by another thread.
        match unsafe { nix::unistd::fork() }.map_err(errno)? {
            nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
            nix::unistd::ForkResult::Child => Ok(None),
        }
    }
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(errno)
    }
    fn chdir(&self, path: &Path) -> io::Result<()> {
        nix::unistd::chdir(path).map_err(errno)
    }
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        nix::unistd::pivot_root(new_root, put_old).map_err(errno)
    }
    fn umount(&self, target: &Path, flags: MntFlags) -> io::Result<()> {
        nix::mount::umount2(target, flags).map_err(errno)
    }
    fn sethostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(errno)
    }
    fn getrlimit(&self, which: Rlimit) -> io::Result<(u64, u64)> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for the kernel to fill.
        check(unsafe { libc::getrlimit(which.resource(), &mut lim) }.into())?;
        Ok((lim.rlim_cur, lim.rlim_max))
    }
    fn setrlimit(&self, which: Rlimit, soft: u64, hard: u64) -> io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `lim` is a valid rlimit the kernel only reads.
        check(unsafe { libc::setrlimit(which.resource(), &lim) }.into())
    }
    fn close_fds_except(&self, keep: &[RawFd]) -> io::Result<()> {
        let mut keep: Vec<u32> = keep
            .iter()
            .filter_map(|&fd| u32::try_from(fd).ok())
            .collect();
        keep.sort_unstable();
        keep.dedup();
        let mut first = 0u32;
        for fd in keep.into_iter().chain([u32::MAX]) {
            if fd > first {
                // SAFETY: close_range only closes fds; the caller listed every fd it
                // still uses in `keep`, and no Rust object owns the others afterwards.
                check(unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) })?;
            }
            first = fd.saturating_add(1);
        }
        Ok(())
    }
    fn last_cap(&self) -> io::Result<u32> {
        // Read once and kept: a jailed vmm has no /proc, and its threads drop their
        // capabilities (which needs this number) after the jail.
        static LAST_CAP: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(cap) = LAST_CAP.get() {
            return Ok(*cap);
        }
        let cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(*LAST_CAP.get_or_init(|| cap))
    }
    fn drop_bounding_cap(&self, cap: u32) -> io::Result<()> {
        // Already out of the set: done. PR_CAPBSET_DROP would fail with EPERM even then
        // without CAP_SETPCAP, which the threads of a jailed vmm no longer have.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 0 {
            return Ok(());
        }
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) }.into())
    }
    fn clear_ambient_caps(&self) -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        check(rc.into())
    }
    fn set_ids(&self, uid: u32, gid: u32) -> io::Result<()> {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        setgroups(&[]).map_err(errno)?;
        let gid = Gid::from_raw(gid);
        setresgid(gid, gid, gid).map_err(errno)?;
        let uid = Uid::from_raw(uid);
        setresuid(uid, uid, uid).map_err(errno)
    }
    fn clear_caps(&self) -> io::Result<()> {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        // SAFETY: capset reads one header and two data records (version 3), both valid.
        check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })
    }
    fn set_not_dumpable(&self) -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }.into())
    }
    fn set_no_new_privs(&self) -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
    }
}
