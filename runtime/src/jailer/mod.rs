//! The jailer: confines the `husk vmm` daemon before it touches guest input.
//!
//! [`Jail::enter`] runs first thing in the daemon, while it is still single-threaded:
//! 1. host side: the jail directory (kernel, initrd, `run/`), a cgroup sized from the
//!    spec's limits plus the VMM's overhead, joined by the process;
//! 2. new mount, pid, ipc, uts and net namespaces, then a fork: the child is PID 1 of the
//!    new pid namespace and becomes the jailed vmm; the parent learns whether the child
//!    got jailed and returns its pid (it reports it and exits, like Firecracker's jailer);
//! 3. in the child: a private tmpfs `dev/` with `kvm` (and `net/tun`), pivot_root into the
//!    jail with the old root detached, rlimits, every fd not listed closed, the jail
//!    user's uid/gid, no capabilities in any set, not dumpable, no_new_privs.
//!
//! The seccomp filters come after, per thread ([`crate::seccomp::install`]).
//! [`Jail::remove`] deletes the directory and the cgroups once the vmm is gone.

pub mod cgroup;
pub mod layout;
pub mod sys;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::Pid;

pub use cgroup::{CgroupLimits, Resources};
pub use layout::{uid_for, JailLayout};
use sys::{RealSys, Rlimit, Sys};

/// Errors entering or removing a jail. Each names the step and the path.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum JailError {
    /// invalid container id for a jail: {0}
    Id(String),
    /// the jail root {0:?} must be an absolute path; fix --root
    RelativeRoot(PathBuf),
    /// {0:?} is not a file; pass the kernel/initrd file itself
    NotAFile(PathBuf),
    /// the jail user must not be root (uid {uid}, gid {gid}); use jailer::uid_for(id)
    RootUser { uid: u32, gid: u32 },
    /// Jail::enter must run before the vmm starts threads ({0} running): unshare and fork need a single-threaded process
    Threads(usize),
    /// the jail {0:?} already exists; run `husk delete` for this id, or pick another id
    Exists(PathBuf),
    /// jailer step `{step}` on {path:?} failed: {source}
    Step {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the jailed vmm failed before it was confined: {0}
    Child(String),
    /// the cgroup {0:?} still has processes; stop the vmm before removing its jail
    CgroupBusy(PathBuf),
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Step {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// RLIMIT_NOFILE of a jailed (or confined) vmm: vsock streams, virtio queues' eventfds
/// and the control clients stay well below it.
pub const DEFAULT_MAX_FDS: u64 = 2048;

/// What the jail is built from.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub id: String,
    /// The per-VM directories go under here (`--root`, e.g. `/run/husk`).
    pub root: PathBuf,
    /// `/sys/fs/cgroup` (tests may point it elsewhere).
    pub cgroup_root: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// More read-only files the vmm needs, linked into the jail's root by file name like
    /// the kernel (the guest template it restores from).
    pub files: Vec<PathBuf>,
    /// Also create `dev/net/tun` (for a network device).
    pub tun: bool,
    pub uid: u32,
    pub gid: u32,
    pub resources: Resources,
    /// fds the vmm keeps open (stdio, inherited sockets); all others are closed.
    pub keep_fds: Vec<RawFd>,
    /// RLIMIT_NOFILE; lowered to the host's hard limit (raising needs CAP_SYS_RESOURCE).
    pub max_fds: u64,
    /// RLIMIT_NPROC (counted per uid, so per VM with [`uid_for`]).
    pub max_procs: u64,
}

impl JailConfig {
    /// A config with the defaults: per-VM uid/gid, stdio kept, 2048 fds, 64 tasks.
    pub fn new(id: &str, root: &Path, kernel: &Path, resources: Resources) -> Self {
        let uid = uid_for(id);
        Self {
            id: id.into(),
            root: root.into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            kernel: kernel.into(),
            initrd: None,
            files: Vec::new(),
            tun: false,
            uid,
            gid: uid,
            resources,
            keep_fds: vec![0, 1, 2],
            max_fds: DEFAULT_MAX_FDS,
            max_procs: 64,
        }
    }
}

/// A jail as the vmm sees it.
#[derive(Debug, Clone)]
pub struct Jail {
    pub layout: JailLayout,
    /// The kernel and initrd paths inside the jail (`/vmlinux`, ...).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// [`JailConfig::files`] as the vmm sees them, in the same order.
    pub files: Vec<PathBuf>,
    /// Where the vmm creates its sockets, inside the jail (`/run`).
    pub run_dir: PathBuf,
    pub cgroup_limits: CgroupLimits,
}

/// Which side of the fork returned from [`Jail::enter`].
#[derive(Debug)]
pub enum Entered {
    /// The launcher: the jailed vmm runs as `child` (its host pid). Report it and exit.
    Parent { child: Pid, jail: Jail },
    /// The jailed vmm: confined, about to install seccomp and start the VM.
    Jailed(Jail),
}

impl Jail {
    /// Builds the jail and enters it; see the module documentation.
    pub fn enter(config: &JailConfig) -> Result<Entered, JailError> {
        enter_with(&RealSys, config)
    }

    /// Removes `<root>/<id>` and the VM's cgroups. Missing pieces are not an error, so a
    /// half-created jail can be removed too.
    pub fn remove(root: &Path, cgroup_root: &Path, id: &str) -> Result<(), JailError> {
        remove_with(&RealSys, root, cgroup_root, id)
    }
}

pub(crate) fn remove_with(
    sys: &dyn Sys,
    root: &Path,
    cgroup_root: &Path,
    id: &str,
) -> Result<(), JailError> {
    let layout = JailLayout::new(root, id)?;
    for controller in cgroup::CONTROLLERS {
        let dir = cgroup::cgroup_dir(cgroup_root, controller, id);
        if !sys.exists(&dir) {
            continue;
        }
        // A cgroup empties a moment after its last task is reaped: retry briefly.
        let mut tries = 0;
        loop {
            match sys.remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(JailError::CgroupBusy(dir))
                }
                Err(e) => return Err(step("remove cgroup", &dir)(e)),
            }
        }
    }
    if sys.exists(&layout.vm_dir) {
        sys.remove_dir_all(&layout.vm_dir)
            .map_err(step("remove jail directory", &layout.vm_dir))?;
    }
    Ok(())
}

pub(crate) fn enter_with(sys: &dyn Sys, config: &JailConfig) -> Result<Entered, JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::RootUser {
            uid: config.uid,
            gid: config.gid,
        });
    }
    let layout = JailLayout::new(&config.root, &config.id)?;
    let threads = sys
        .thread_count()
        .map_err(step("count threads", Path::new("/proc/self/task")))?;
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    if sys.exists(&layout.vm_dir) {
        return Err(JailError::Exists(layout.vm_dir));
    }
    let jail = match prepare_host_side(sys, config, &layout) {
        Ok(jail) => jail,
        Err(e) => {
            let _ = remove_with(sys, &config.root, &config.cgroup_root, &config.id);
            return Err(e);
        }
    };
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| step("create the report pipe", &layout.vm_dir)(std::io::Error::from(e)))?;
    // A new pid namespace applies to the children of the caller only: the launcher stays
    // where it is (and in the host's other namespaces), its child is PID 1 of the new one.
    let forked = sys
        .unshare(CloneFlags::CLONE_NEWPID)
        .map_err(step("unshare the pid namespace", &layout.jail))
        .and_then(|()| {
            sys.fork()
                .map_err(step("fork into the new pid namespace", &layout.jail))
        });
    match forked {
        Err(e) => {
            let _ = remove_with(sys, &config.root, &config.cgroup_root, &config.id);
            Err(e)
        }
        Ok(Some(child)) => {
            drop(report_w);
            let mut report = String::new();
            let _ = std::fs::File::from(report_r).read_to_string(&mut report);
            if report == "ok" {
                return Ok(Entered::Parent { child, jail });
            }
            // The child failed and exits; reap it before removing what it used.
            let _ = nix::sys::wait::waitpid(child, None);
            if report.is_empty() {
                report = "it exited without reporting".into();
            }
            if let Err(e) = remove_with(sys, &config.root, &config.cgroup_root, &config.id) {
                report = format!("{report} (and removing its jail failed: {e})");
            }
            Err(JailError::Child(report))
        }
        Ok(None) => {
            drop(report_r);
            let result = confine(sys, config, &layout, &report_w);
            let mut w = std::fs::File::from(report_w);
            let _ = match &result {
                Ok(()) => w.write_all(b"ok"),
                Err(e) => w.write_all(e.to_string().as_bytes()),
            };
            result.map(|()| Entered::Jailed(jail))
        }
    }
}

/// Directory, boot files, cgroup: everything made from the host's view.
fn prepare_host_side(
    sys: &dyn Sys,
    config: &JailConfig,
    layout: &JailLayout,
) -> Result<Jail, JailError> {
    sys.create_dir(&layout.vm_dir, 0o700)
        .map_err(step("create the VM directory", &layout.vm_dir))?;
    // Root-owned and read-only to the jail user: it can read the boot files and use
    // `run/` but not replace anything.
    sys.create_dir(&layout.jail, 0o755)
        .map_err(step("create the jail", &layout.jail))?;
    // The jail user must be able to reach `jail/` through `<root>/<id>` for nothing: after
    // pivot_root the vm_dir is not on its path, so 0700 is fine.
    let (kernel_host, kernel) = layout.boot_file(&config.kernel)?;
    sys.link_or_copy(&config.kernel, &kernel_host)
        .map_err(step("put the kernel into the jail", &config.kernel))?;
    let initrd = match &config.initrd {
        Some(file) => {
            let (host, inside) = layout.boot_file(file)?;
            sys.link_or_copy(file, &host)
                .map_err(step("put the initrd into the jail", file))?;
            Some(inside)
        }
        None => None,
    };
    let mut files = Vec::new();
    for file in &config.files {
        let (host, inside) = layout.boot_file(file)?;
        sys.link_or_copy(file, &host)
            .map_err(step("put a file into the jail", file))?;
        files.push(inside);
    }
    let dev = layout.dev_dir();
    sys.create_dir(&dev, 0o755)
        .map_err(step("create dev/", &dev))?;
    let run = layout.run_dir();
    sys.create_dir(&run, 0o700)
        .map_err(step("create run/", &run))?;
    sys.chown(&run, config.uid, config.gid)
        .map_err(step("give run/ to the jail user", &run))?;
    let limits = CgroupLimits::for_vm(&config.resources);
    for controller in cgroup::CONTROLLERS {
        let dir = cgroup::cgroup_dir(&config.cgroup_root, controller, &config.id);
        let parent = dir.parent().unwrap_or(&dir);
        if !sys.exists(parent) {
            // Shared by all VMs; a concurrent create of it is fine.
            if let Err(e) = sys.create_dir(parent, 0o755) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(step("create the husk cgroup", parent)(e));
                }
            }
        }
        create_vm_cgroup(sys, &dir)?;
    }
    for (controller, file, value) in limits.files() {
        let path = cgroup::cgroup_dir(&config.cgroup_root, controller, &config.id).join(file);
        sys.write_file(&path, &value)
            .map_err(step("set a cgroup limit", &path))?;
    }
    Ok(Jail {
        layout: layout.clone(),
        kernel,
        initrd,
        files,
        run_dir: PathBuf::from("/run"),
        cgroup_limits: limits,
    })
}

/// In the forked child (PID 1 of the new pid namespace): mounts, pivot_root, limits,
/// fds, identity, capabilities. `report` stays open until the end.
fn confine(
    sys: &dyn Sys,
    config: &JailConfig,
    layout: &JailLayout,
    report: &OwnedFd,
) -> Result<(), JailError> {
    let jail = &layout.jail;
    sys.unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(step("unshare mount, ipc, uts and net namespaces", jail))?;
    // /proc is out of reach after pivot_root: read what is needed from it now.
    let last_cap = sys.last_cap().map_err(step(
        "read cap_last_cap",
        Path::new("/proc/sys/kernel/cap_last_cap"),
    ))?;
    // Only the child joins the cgroup ("0" is the writer), so the launcher never keeps
    // it busy; its threads and helpers are born inside.
    for controller in cgroup::CONTROLLERS {
        let path =
            cgroup::cgroup_dir(&config.cgroup_root, controller, &config.id).join("cgroup.procs");
        sys.write_file(&path, "0")
            .map_err(step("join the cgroup", &path))?;
    }
    // Nothing mounted from here on may propagate back to the host.
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .map_err(step("make mounts private", Path::new("/")))?;
    // pivot_root needs the new root to be a mount point.
    sys.mount(
        Some(&jail.to_string_lossy()),
        jail,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(step("bind the jail onto itself", jail))?;
    // Device nodes on a tmpfs of this namespace: usable even when --root is on a nodev
    // filesystem, and gone with the namespace.
    let dev = layout.dev_dir();
    sys.mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )
    .map_err(step("mount a tmpfs on dev/", &dev))?;
    let kvm = dev.join("kvm");
    sys.mknod_char(&kvm, 10, 232, 0o660)
        .map_err(step("create dev/kvm", &kvm))?;
    sys.chown(&kvm, config.uid, config.gid)
        .map_err(step("give dev/kvm to the jail user", &kvm))?;
    if config.tun {
        let net = dev.join("net");
        sys.create_dir(&net, 0o755)
            .map_err(step("create dev/net", &net))?;
        let tun = net.join("tun");
        sys.mknod_char(&tun, 10, 200, 0o660)
            .map_err(step("create dev/net/tun", &tun))?;
        sys.chown(&tun, config.uid, config.gid)
            .map_err(step("give dev/net/tun to the jail user", &tun))?;
    }
    sys.sethostname("husk")
        .map_err(step("set the hostname", jail))?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only
    // the jail (no directory for the old root needed).
    sys.chdir(jail).map_err(step("enter the jail", jail))?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .map_err(step("pivot_root into the jail", jail))?;
    sys.umount(Path::new("."), MntFlags::MNT_DETACH)
        .map_err(step("detach the old root", jail))?;
    sys.chdir(Path::new("/"))
        .map_err(step("chdir /", Path::new("/")))?;
    set_rlimits(sys, config)?;
    let mut keep = config.keep_fds.clone();
    keep.push(report.as_raw_fd());
    sys.close_fds_except(&keep)
        .map_err(step("close inherited fds", Path::new("/proc/self/fd")))?;
    drop_privileges(sys, config, last_cap)
}

/// Creates a VM's cgroup. One left by an earlier sandbox of the same id that died without
/// its `delete` (killed together with the tests driving it, say) is removed first: the
/// kernel removes a cgroup directory only while no process is in it, so a live sandbox's
/// stays, and this create fails naming the cgroup.
fn create_vm_cgroup(sys: &dyn Sys, dir: &Path) -> Result<(), JailError> {
    match sys.create_dir(dir, 0o755) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            sys.remove_dir(dir).map_err(step(
                "remove the cgroup an earlier sandbox with this id left (if it still runs, delete it first)",
                dir,
            ))?;
            sys.create_dir(dir, 0o755)
                .map_err(step("create the VM's cgroup", dir))
        }
        other => other.map_err(step("create the VM's cgroup", dir)),
    }
}

fn set_rlimits(sys: &dyn Sys, config: &JailConfig) -> Result<(), JailError> {
    let path = Path::new("rlimit");
    for (which, want) in [
        (Rlimit::NoFile, config.max_fds),
        (Rlimit::NProc, config.max_procs),
        // Guest memory must never land in a core file.
        (Rlimit::Core, 0),
    ] {
        let (_, hard) = sys.getrlimit(which).map_err(step("read an rlimit", path))?;
        // Only lowering is possible without CAP_SYS_RESOURCE.
        let value = want.min(hard);
        sys.setrlimit(which, value, value)
            .map_err(step("set an rlimit", path))?;
    }
    Ok(())
}

fn drop_privileges(sys: &dyn Sys, config: &JailConfig, last_cap: u32) -> Result<(), JailError> {
    let path = Path::new("capabilities");
    // The bounding set can only shrink while CAP_SETPCAP is held: before the uid change.
    drop_bounding_and_ambient(sys, last_cap)?;
    sys.set_ids(config.uid, config.gid)
        .map_err(step("switch to the jail user", path))?;
    // setresuid away from 0 clears permitted/effective; capset makes sure of all three.
    sys.clear_caps().map_err(step("clear capabilities", path))?;
    sys.set_not_dumpable()
        .map_err(step("set not dumpable", path))?;
    sys.set_no_new_privs()
        .map_err(step("set no_new_privs", path))
}

/// Drops every capability of the calling thread: the bounding set, the ambient set,
/// then effective, permitted and inheritable (capabilities are per thread, so each
/// thread of the daemon calls this for itself, right before its seccomp filter). The
/// thread keeps its uid: what it may still touch is what that uid owns.
pub fn drop_thread_capabilities() -> Result<(), JailError> {
    let sys = RealSys;
    let last_cap = sys.last_cap().map_err(step(
        "read cap_last_cap",
        Path::new("/proc/sys/kernel/cap_last_cap"),
    ))?;
    drop_bounding_and_ambient(&sys, last_cap)?;
    sys.clear_caps()
        .map_err(step("clear capabilities", Path::new("capabilities")))
}

/// Empties the bounding set (capabilities 0 to `last_cap`) and the ambient set.
fn drop_bounding_and_ambient(sys: &dyn Sys, last_cap: u32) -> Result<(), JailError> {
    let path = Path::new("capabilities");
    for cap in 0..=last_cap {
        sys.drop_bounding_cap(cap)
            .map_err(step("drop a bounding capability", path))?;
    }
    sys.clear_ambient_caps()
        .map_err(step("clear ambient capabilities", path))
}

/// The jail's process-wide rlimits for a daemon that is not jailed: no core file (guest
/// memory must never land in one) and at most [`DEFAULT_MAX_FDS`] fds. Only lowers.
pub fn lower_process_rlimits() -> Result<(), JailError> {
    let sys = RealSys;
    let path = Path::new("rlimit");
    for (which, want) in [(Rlimit::NoFile, DEFAULT_MAX_FDS), (Rlimit::Core, 0)] {
        let (soft, hard) = sys.getrlimit(which).map_err(step("read an rlimit", path))?;
        sys.setrlimit(which, want.min(soft), want.min(hard))
            .map_err(step("set an rlimit", path))?;
    }
    Ok(())
}
