//! The jailed vmm (`DaemonConfig::jail`, VM guests): the daemon is a launcher that does
//! what needs the host's view, enters the jail ([`crate::jailer::Jail::enter`]), and
//! reports the jailed child's host pid once the container exists.
//!
//! ```text
//! launcher (uid 0, host namespaces)                jailed vmm (PID 1 of its pid ns,
//!   share bind mount, guest spec, console pty        uid = jailer::uid_for(id), root = jail)
//!   network: tap opened in the container's netns
//!   template: made if missing, in a forked child (own VM + virtiofsd; only husk's
//!     kernel and agent run in it)
//!   virtiofsd --sandbox namespace on the host share, connected
//!   Jail::enter ─── fork ──────────────────────────> seccomp per thread, guest restored from
//!   waits on the result pipe <───── "ok" ───────────  /<key>.snap with the handed fds,
//!   "ok <child pid>" to create, exits                  container at the exec barrier, control
//! ```
//!
//! The jailed vmm gets a net namespace of its own even with a NIC: the tap was opened in
//! the container's namespace by the launcher, and an open tap fd keeps working whatever
//! namespace its holder is in, so the vmm needs neither `/dev/net/tun` nor that namespace.
//!
//! A failure anywhere before "ok" is undone by the launcher (it is root, in the host's
//! namespaces): the jailed child is killed and reaped, then its jail and cgroups, the
//! network attachment, virtiofsd and the share are removed.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::ForkResult;

use super::config::{DaemonConfig, GuestKind};
use super::guest::GuestError;
use super::ready::{self, ReadyWriter};
use super::run::{self, Prepared, RunDirs};
use super::vm_guest::{Handed, MicroVm};
use super::{io_err, share, DaemonError, Layout};
use crate::artifacts::{self, Artifact};
use crate::jailer::{Entered, Jail, JailConfig, Resources};
use crate::vmm::devices::virtio::fs::{Virtiofsd, VirtiofsdConfig};
use crate::vmm::guest::{GuestNet, GuestVm, GuestVmConfig, TemplateState, VIRTIOFSD_SOCKET};

/// Exit code when the launcher or the jailed vmm failed before the container existed.
const LOST: i32 = 255;
/// How long the jailed vmm may take to have the container at the exec barrier (a cold
/// boot on a PVM host is ~60 s). Below `create`'s own 300 s, so that the launcher, which
/// can kill the child and remove its jail, gives up first rather than being killed.
const JAILED_CREATE_TIMEOUT: Duration = Duration::from_secs(240);
/// The cgroup hierarchy (v1 on these hosts; see `jailer::cgroup`).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What the launcher made on the host, removed again by [`HostSide::undo`].
struct HostSide {
    /// Holds the network attachment (its record is in the host run directory).
    net_owner: Option<Box<MicroVm>>,
    virtiofsd: Option<Virtiofsd>,
}

impl HostSide {
    fn undo(mut self, layout: &Layout) {
        // Kills virtiofsd (and its sandboxed worker) and removes its socket.
        drop(self.virtiofsd.take());
        if let Some(mut owner) = self.net_owner.take() {
            owner.detach(&layout.host_run_dir());
        }
        run::remove_guest_net(layout);
        if let Err(e) = share::remove(&layout.share_dir(), &layout.rootfs_mount()) {
            log::warn!("{e}");
        }
        if let Err(e) = Jail::remove(&layout.jail_root(), Path::new(CGROUP_ROOT), layout.id()) {
            log::warn!("{e}");
        }
        let _ = std::fs::remove_dir_all(layout.host_run_dir());
        let _ = std::fs::remove_dir(layout.jail_root());
    }

    /// The jailed vmm runs: virtiofsd and the network attachment are its now.
    fn keep(mut self) {
        if let Some(virtiofsd) = self.virtiofsd.take() {
            let pid = virtiofsd.detach();
            log::info!("virtiofsd (pid {pid}) serves the jailed vmm");
        }
        // Dropping the owner closes the launcher's fds only (the tap stays open in the
        // jailed vmm); `husk delete` removes the redirects from the record.
        drop(self.net_owner.take());
    }
}

/// Runs the launcher; returns the exit code of whichever process returns here (the
/// launcher: 0 once the jailed vmm reported; the jailed vmm: the container's).
pub fn launch(config: &DaemonConfig, ready: ReadyWriter, log_fd: Option<RawFd>) -> i32 {
    let layout = config.layout();
    crate::seccomp::confine_process(run::seccomp_mode(config));
    // Detected (and cached) here: the jail has no /sys, and the guest's command line (the
    // PVM compatibility options) and the template key depend on it.
    let mode = crate::host::HostMode::detect();
    log::info!("host KVM mode: {}", mode.as_str());
    let prepared = match prepare(config, &layout) {
        Ok(p) => p,
        Err(e) => {
            log::error!("create failed: {e}");
            // run::prepare removed what it made; these two directories are empty.
            let _ = std::fs::remove_dir(layout.host_run_dir());
            let _ = std::fs::remove_dir(layout.jail_root());
            ready.err(&e.to_string());
            return LOST;
        }
    };
    let mut host = HostSide {
        net_owner: None,
        virtiofsd: None,
    };
    let handed = match host_side(config, &layout, &prepared, &mut host) {
        Ok(h) => h,
        Err(e) => return fail(&layout, host, ready, &e.to_string()),
    };
    let (result_r, result_w) = match ready::pipe() {
        Ok(pipe) => pipe,
        Err(e) => return fail(&layout, host, ready, &e.to_string()),
    };
    let jail_config = match jail_config(config, &layout, &prepared, &handed, &result_w, log_fd) {
        Ok(c) => c,
        Err(e) => return fail(&layout, host, ready, &e.to_string()),
    };
    if let Err(e) = single_threaded() {
        return fail(&layout, host, ready, &e.to_string());
    }
    match Jail::enter(&jail_config) {
        Err(e) => fail(&layout, host, ready, &e.to_string()),
        Ok(Entered::Parent { child, .. }) => {
            // Only the jailed vmm may hold these: the result pipe's EOF and virtiofsd's
            // end of connection must follow the vmm's life, not the launcher's.
            drop(result_w);
            drop(handed);
            drop(prepared);
            match result_r.wait(JAILED_CREATE_TIMEOUT, "jailed vmm", &layout.log()) {
                Ok(_) => {
                    host.keep();
                    log::info!("the jailed vmm runs as pid {child}");
                    ready.ok(child.as_raw());
                    0
                }
                Err(e) => {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    fail(&layout, host, ready, &e.to_string())
                }
            }
        }
        Ok(Entered::Jailed(jail)) => {
            // Confined; every fd but the kept ones is closed. These objects' fds were
            // among the closed ones: dropping them would close numbers that may be
            // reused by then.
            std::mem::forget(ready);
            std::mem::forget(host);
            std::mem::forget(result_r);
            let result = ReadyWriter::from_file(result_w.into());
            jailed_main(config, layout, prepared, handed, jail, result)
        }
    }
}

/// The share, the spec, the console; the jail's parent directory.
fn prepare(config: &DaemonConfig, layout: &Layout) -> Result<Prepared, DaemonError> {
    for dir in [layout.host_run_dir(), layout.jail_root()] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
    }
    run::prepare(config, layout)
}

/// The network attachment, the template, virtiofsd.
fn host_side(
    config: &DaemonConfig,
    layout: &Layout,
    prepared: &Prepared,
    host: &mut HostSide,
) -> Result<Handed, DaemonError> {
    let run_dir = layout.host_run_dir();
    let mut owner = Box::new(
        MicroVm::new(&config.guest)
            .ok_or_else(not_a_vm)?
            .with_netns(prepared.netns.clone()),
    );
    // The template VM's sockets (vsock, its own virtiofsd) in a directory of their own,
    // apart from the sandbox's virtiofsd socket and pid file.
    let template_run = run_dir.join("template");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&template_run)
        .map_err(io_err("creating", &template_run))?;
    let guest_config = owner.guest_config(&layout.share_dir(), &template_run);
    let net = owner.attach_netns(&run_dir);
    host.net_owner = Some(owner);
    let net: Option<GuestNet> = net?;
    let template = match &net {
        // A template has no NIC: such a guest boots cold.
        Some(_) => None,
        None => template(&guest_config)?,
    };
    let binary = artifacts::locate(Artifact::Virtiofsd, None)
        .map_err(|e| GuestError::from(crate::vmm::guest::GuestVmError::from(e)))?;
    let virtiofsd_config =
        VirtiofsdConfig::new(binary, layout.share_dir(), run_dir.join(VIRTIOFSD_SOCKET));
    let (virtiofsd, stream) =
        Virtiofsd::start(&virtiofsd_config).map_err(DaemonError::Virtiofsd)?;
    log::info!(
        "virtiofsd (pid {}) started for the jail on {}",
        virtiofsd.pid(),
        layout.share_dir().display()
    );
    host.virtiofsd = Some(virtiofsd);
    Ok(Handed {
        virtiofsd: Arc::new(stream),
        net,
        template,
    })
}

/// The template to hand the jailed vmm, made first if there is none. It is made in a
/// forked child: the template VM's threads (and whatever they leave behind) end with that
/// process, and the launcher stays single-threaded for `Jail::enter`. Only husk's kernel
/// and agent run in that guest before it is saved, so nothing untrusted reaches this
/// unjailed VMM. A failure to make it is logged and the guest boots cold.
fn template(guest_config: &GuestVmConfig) -> Result<Option<PathBuf>, DaemonError> {
    let path = match GuestVm::template_state(guest_config).map_err(GuestError::from)? {
        TemplateState::Ready(path) => return Ok(Some(path)),
        TemplateState::NotUsed | TemplateState::Removed => return Ok(None),
        TemplateState::Missing(path) => path,
    };
    single_threaded()?;
    // SAFETY: the process is single-threaded (checked above), so the child may run any
    // code, allocate and start threads; it leaves only through `exit`.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => {
            let code = match GuestVm::make_template(guest_config, &path) {
                Ok(()) => 0,
                Err(e) => {
                    log::warn!("making template {}: {e}; booting cold", path.display());
                    1
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => {
            let made = matches!(
                nix::sys::wait::waitpid(child, None),
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0))
            );
            Ok((made && path.exists()).then_some(path))
        }
        Err(e) => Err(io_err("forking the template maker", &path)(e.into())),
    }
}

fn not_a_vm() -> DaemonError {
    DaemonError::Guest(GuestError::Unsupported(
        "a jail (only microVM guests are jailed)",
    ))
}

/// The jail: kernel, initrd and template linked in, sized from the spec, keeping stdio,
/// the log, the result pipe and the handed fds.
fn jail_config(
    config: &DaemonConfig,
    layout: &Layout,
    prepared: &Prepared,
    handed: &Handed,
    result: &std::os::fd::OwnedFd,
    log_fd: Option<RawFd>,
) -> Result<JailConfig, DaemonError> {
    let GuestKind::Vm {
        kernel,
        initrd,
        vcpus,
        mem_mib,
        ..
    } = &config.guest
    else {
        return Err(not_a_vm());
    };
    let cpu = prepared
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.cpu().as_ref());
    let resources = Resources {
        vcpus: *vcpus,
        guest_mem_mib: *mem_mib,
        cpu_quota_us: cpu.and_then(|c| c.quota()),
        cpu_period_us: cpu.and_then(|c| c.period()),
    };
    let mut jail = JailConfig::new(config.id.as_str(), &layout.jail_root(), kernel, resources);
    jail.cgroup_root = CGROUP_ROOT.into();
    jail.initrd = Some(initrd.clone());
    jail.files = handed.template.iter().cloned().collect();
    jail.keep_fds.push(result.as_raw_fd());
    jail.keep_fds.push(handed.virtiofsd.as_raw_fd());
    jail.keep_fds.extend(log_fd);
    jail.keep_fds
        .extend(handed.net.iter().map(|n| n.device.tap.as_raw_fd()));
    jail.keep_fds
        .extend(prepared.console.iter().map(|c| c.as_raw_fd()));
    Ok(jail)
}

/// Refuses to go on unless the process has one thread (fork and unshare need it),
/// naming the threads that are there. A thread that was just joined (the network
/// attachment's namespace worker) can stay listed for a moment: it gets a second.
fn single_threaded() -> Result<(), DaemonError> {
    let task = Path::new("/proc/self/task");
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let names: Vec<String> = std::fs::read_dir(task)
            .map_err(io_err("counting threads in", task))?
            .flatten()
            .map(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                format!("{} ({})", t.file_name().to_string_lossy(), comm.trim())
            })
            .collect();
        if names.len() == 1 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io_err("checking the launcher is single-threaded", task)(
                std::io::Error::other(format!(
                    "threads {} are running; the launcher must start none before the jail",
                    names.join(", ")
                )),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reports `msg` to `create` after undoing the host side.
fn fail(layout: &Layout, host: HostSide, ready: ReadyWriter, msg: &str) -> i32 {
    log::error!("create failed: {msg}");
    host.undo(layout);
    ready.err(msg);
    LOST
}

/// In the jail: the guest from the handed pieces, the container, then as the daemon.
fn jailed_main(
    config: &DaemonConfig,
    layout: Layout,
    prepared: Prepared,
    mut handed: Handed,
    jail: Jail,
    result: ReadyWriter,
) -> i32 {
    // The template as the jail holds it (`JailConfig::files` has only the template).
    handed.template = handed.template.and(jail.files.first().cloned());
    let GuestKind::Vm { initrd, .. } = &config.guest else {
        result.err("a jail holds microVM guests only");
        return LOST;
    };
    let initrd_inside = jail
        .initrd
        .clone()
        .unwrap_or_else(|| Path::new("/").join(initrd.file_name().unwrap_or_default()));
    let guest = match MicroVm::new(&config.guest) {
        Some(vm) => vm.jailed(jail.kernel.clone(), initrd_inside, handed),
        None => {
            result.err("a jail holds microVM guests only");
            return LOST;
        }
    };
    let dirs = RunDirs {
        inside: jail.run_dir.clone(),
        host: layout.run_dir(),
    };
    match run::run_guest(config, layout, prepared, Box::new(guest), &dirs) {
        Ok(running) => {
            // No getuid here: the main thread runs under the control filter by now.
            log::info!(
                "jailed vmm ready: uid {}, root {}",
                crate::jailer::uid_for(&config.id),
                jail.layout.jail.display()
            );
            result.ok(1);
            running.wait()
        }
        Err(e) => {
            log::error!("create failed in the jail: {e}");
            result.err(&e.to_string());
            LOST
        }
    }
}
