//! The daemon's main sequence: share, guest, container at the exec barrier, stdio
//! relays, control thread, `ok PID` on the ready pipe; then wait for the container's
//! init, drain its output, shut the guest down and exit with the init's exit code.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocol::client::AgentClient;
use husk_protocol::messages::{ProcessRef, StdioRequest};
use husk_protocol::ExitStatus;

use super::config::{DaemonConfig, GuestKind};
use super::control::{self, Shared};
use super::guest::{GuestBackend, HostAgent};
use super::layout::{CONTROL_SOCKET, GUEST_FILE};
use super::ready::ReadyWriter;
use super::relay::{self, Relays};
use super::vm_guest::MicroVm;
use super::{agent_err, io_err, share, DaemonError, Layout};
use crate::oci::{Bundle, Status};
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vmm::guest::GUEST_SHARE_DIR;

/// How long the container's last output may take to reach the host after it exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit code when the daemon lost the container (agent or guest failure).
const LOST: i32 = 255;

/// A running sandbox, between `ok PID` and exit.
pub(super) struct Running {
    layout: Layout,
    shared: Arc<Shared>,
    relays: Relays,
    waiter: AgentClient,
}

/// Runs the daemon; returns its exit code (the container's, shell convention).
pub fn main(config_path: &Path, ready_fd: RawFd) -> i32 {
    let ready = match ReadyWriter::from_raw(ready_fd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("husk vmm daemon: {e}");
            return LOST;
        }
    };
    let config = match DaemonConfig::read(config_path) {
        Ok(c) => c,
        Err(e) => {
            ready.err(&e.to_string());
            return LOST;
        }
    };
    let layout = config.layout();
    let mut log_fd = None;
    if let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log())
    {
        log_fd = Some(file.as_raw_fd());
        super::logger::init(file);
    }
    if config.jail && matches!(config.guest, GuestKind::Vm { .. }) {
        return super::jailed::launch(&config, ready, log_fd);
    }
    match start(&config) {
        Ok(running) => {
            ready.ok(std::process::id() as i32);
            running.wait()
        }
        Err(e) => {
            log::error!("create failed: {e}");
            ready.err(&e.to_string());
            LOST
        }
    }
}

pub(super) fn backend(config: &DaemonConfig, netns: Option<PathBuf>) -> Box<dyn GuestBackend> {
    match &config.guest {
        GuestKind::HostAgent { agent } => Box::new(HostAgent::new(agent)),
        kind => Box::new(
            MicroVm::new(kind)
                .expect("a VM guest kind")
                .with_netns(netns),
        ),
    }
}

/// The spec as the guest gets it (see [`crate::net::guest`]) and the network namespace
/// to attach to. The test-only host agent runs on the host: the spec stays as it is.
fn guest_spec(
    config: &DaemonConfig,
    layout: &Layout,
    spec: &mut oci_spec::runtime::Spec,
) -> Result<Option<PathBuf>, DaemonError> {
    let host_mounts = share::mounts_dir(&layout.rootfs_mount());
    crate::sandbox::hooks::keep_guest_hooks(spec);
    match config.guest {
        // The host agent sees the share where it is on the host.
        GuestKind::HostAgent { .. } => {
            share::bind_host_mounts(spec, &host_mounts, &host_mounts)?;
            Ok(None)
        }
        GuestKind::Vm { .. } => {
            let in_guest = Path::new(GUEST_SHARE_DIR).join(&config.id);
            share::bind_host_mounts(spec, &host_mounts, &in_guest.join("mounts"))?;
            let in_guest = in_guest.join("etc");
            Ok(crate::net::guest::prepare_spec(
                spec,
                &layout.name_files(),
                &in_guest,
            )?)
        }
    }
}

/// Removes what the guest's network left on the host (redirects, name-file copies).
pub(super) fn remove_guest_net(layout: &Layout) {
    if let Err(e) = crate::net::guest::cleanup(&layout.host_run_dir(), &layout.name_files()) {
        log::warn!("{e}");
    }
}

/// What the guest needs from the bundle and the host, made before the guest starts.
pub(super) struct Prepared {
    /// The spec as the guest gets it.
    pub spec: oci_spec::runtime::Spec,
    pub terminal: bool,
    /// The host pty's slave side when `process.terminal` (its master went to the console
    /// socket already).
    pub console: Option<std::fs::File>,
    /// The network namespace to attach the guest to.
    pub netns: Option<PathBuf>,
}

/// The bundle as a guest container needs it: the spec, whether it wants a terminal (and
/// then the console socket, which it must have), whether its root is read-only (and
/// then the mount points it lacks are made first, as runc does).
pub(super) struct GuestBundle {
    pub spec: oci_spec::runtime::Spec,
    pub terminal: bool,
    pub console_socket: Option<PathBuf>,
    pub readonly: bool,
}

impl GuestBundle {
    pub(super) fn load(
        bundle: &Path,
        rootfs: &Path,
        console_socket: Option<&PathBuf>,
    ) -> Result<Self, DaemonError> {
        let loaded = Bundle::load(bundle).map_err(|e| DaemonError::Io {
            what: "loading the bundle",
            path: bundle.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let spec = loaded.spec;
        let process = spec.process().as_ref().ok_or(DaemonError::NoProcess)?;
        let terminal = process.terminal().unwrap_or(false);
        let console_socket = match (console_socket, terminal) {
            (Some(socket), true) => Some(socket.clone()),
            (None, true) => return Err(DaemonError::NoConsoleSocket),
            _ => None,
        };
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        if readonly {
            share::create_mount_points(rootfs, spec.mounts().as_deref().unwrap_or(&[]))?;
        }
        Ok(GuestBundle {
            spec,
            terminal,
            console_socket,
            readonly,
        })
    }
}

/// Bundle, share, the guest's spec, the console. On failure what was made is removed.
pub(super) fn prepare(config: &DaemonConfig, layout: &Layout) -> Result<Prepared, DaemonError> {
    let GuestBundle {
        mut spec,
        terminal,
        console_socket,
        readonly,
    } = GuestBundle::load(
        &config.bundle,
        &config.rootfs,
        config.console_socket.as_ref(),
    )?;
    share::prepare(
        &layout.share_dir(),
        &layout.rootfs_mount(),
        &config.rootfs,
        readonly,
    )?;
    let made = guest_spec(config, layout, &mut spec).and_then(|netns| {
        let console = console_socket
            .map(|socket| relay::open_console(&socket))
            .transpose()?;
        Ok((netns, console))
    });
    match made {
        Ok((netns, console)) => Ok(Prepared {
            spec,
            terminal,
            console,
            netns,
        }),
        Err(e) => {
            remove_guest_net(layout);
            let _ = share::remove(&layout.share_dir(), &layout.rootfs_mount());
            Err(e)
        }
    }
}

/// Where the guest's sockets are: as this process sees them (`/run` in a jail) and as
/// the host sees them (what `guest.json` tells `husk exec`).
pub(super) struct RunDirs {
    pub inside: PathBuf,
    pub host: PathBuf,
}

/// Everything up to the container waiting at the exec barrier. On failure, what was
/// made is undone here: the guest is stopped, the share unmounted.
fn start(config: &DaemonConfig) -> Result<Running, DaemonError> {
    let layout = config.layout();
    // Before any thread of the VMM exists: each one installs its filter as it starts.
    if let GuestKind::Vm { .. } = config.guest {
        seccomp::confine_process(seccomp_mode(config));
        crate::jailer::lower_process_rlimits()?;
    }
    let run_dir = layout.run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run_dir)
        .map_err(io_err("creating the run directory", &run_dir))?;
    let prepared = prepare(config, &layout)?;
    let guest = backend(config, prepared.netns.clone());
    let dirs = RunDirs {
        inside: run_dir.clone(),
        host: run_dir,
    };
    run_guest(config, layout.clone(), prepared, guest, &dirs).inspect_err(|_| {
        remove_guest_net(&layout);
        let _ = share::remove(&layout.share_dir(), &layout.rootfs_mount());
    })
}

/// The guest, the container at the exec barrier, its stdio relays and the control
/// socket; then the main thread's filter. Shared by the daemon and the jailed vmm. On
/// failure the guest is stopped; what the host side made is the caller's to undo.
pub(super) fn run_guest(
    config: &DaemonConfig,
    layout: Layout,
    prepared: Prepared,
    mut guest: Box<dyn GuestBackend>,
    dirs: &RunDirs,
) -> Result<Running, DaemonError> {
    let Prepared {
        spec,
        terminal,
        console,
        ..
    } = prepared;
    let started = (|| {
        let address = guest.start(&layout.share_dir(), &dirs.inside)?;
        let guest_file = dirs.inside.join(GUEST_FILE);
        let json = serde_json::to_vec(&address.seen_from(&dirs.inside, &dirs.host))
            .expect("addresses serialize");
        std::fs::write(&guest_file, json).map_err(io_err("writing", &guest_file))?;
        let connector = address.connector();
        let rootfs = guest
            .guest_share_dir(&layout.share_dir())
            .join(&config.id)
            .join("rootfs");
        let stdio = StdioRequest {
            stdin: !terminal && relay::has_stdin(),
        };
        let spawned = AgentClient::connect(&*connector)
            .and_then(|mut a| a.create_container(&config.id, spec, rootfs, stdio))
            .map_err(agent_err("creating the container in the guest"))?;
        let relays = match console {
            Some(slave) => relay::attach_pty(&*connector, spawned.stdio, slave)?,
            None => relay::attach_pipes(&*connector, spawned.stdio)?,
        };
        let waiter =
            AgentClient::connect(&*connector).map_err(agent_err("connecting to the agent"))?;
        let listener = control::bind(&dirs.inside.join(CONTROL_SOCKET))?;
        Ok((connector, relays, waiter, listener))
    })();
    let (connector, relays, waiter, listener) = match started {
        Ok(parts) => parts,
        Err(e) => {
            guest.stop();
            return Err(e);
        }
    };
    let shared = Arc::new(Shared {
        id: config.id.clone(),
        status: Mutex::new(Status::Created),
        connector,
        guest: Mutex::new(guest),
    });
    spawn_control(listener, shared.clone())?;
    // The main thread from here on only waits for the container and shuts the guest
    // down: the control allowlist covers that (agent calls, joins).
    seccomp::install_configured(ThreadKind::Control)?;
    Ok(Running {
        layout,
        shared,
        relays,
        waiter,
    })
}

/// The filters apply to the VM daemon only: the test-only host agent is a child the
/// daemon must spawn and reap, which the control allowlist rightly forbids.
pub(super) fn seccomp_mode(config: &DaemonConfig) -> SeccompMode {
    match config.guest {
        GuestKind::HostAgent { .. } => SeccompMode::Off,
        GuestKind::Vm { .. } => config.seccomp.parse().unwrap_or_default(),
    }
}

fn spawn_control(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("husk-control".into())
        .spawn(move || {
            if let Err(e) = seccomp::install_configured(ThreadKind::Control) {
                // Serving without the filter would be a silent downgrade.
                log::error!("{e}; the control socket is not served");
                return;
            }
            control::serve(listener, shared)
        })
        .map(drop)
        .map_err(|e| io_err("starting the control thread", Path::new("-"))(e))
}

impl Running {
    pub(super) fn wait(mut self) -> i32 {
        let init = ProcessRef {
            container_id: self.shared.id.clone(),
            exec_id: None,
        };
        let code = match self.waiter.wait_process(init) {
            Ok(status) => {
                log::info!("container exited: {status:?}");
                status.code()
            }
            Err(e) => {
                log::error!("lost the container: {e}");
                ExitStatus::Exited(LOST).code()
            }
        };
        self.shared.set_status(Status::Stopped);
        if !self.relays.drain(DRAIN_TIMEOUT) {
            log::warn!("the container's output was not drained within {DRAIN_TIMEOUT:?}");
        }
        self.shared
            .guest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop();
        // A confined daemon may not unlink or unmount (no rule allows it), and a jailed
        // one cannot see the host's paths: `husk delete` removes the socket and the share
        // mount, as it does after a crashed daemon.
        let confined = !matches!(seccomp::process_mode(), None | Some(SeccompMode::Off));
        if !confined && !self.layout.jailed() {
            let _ = std::fs::remove_file(self.layout.control_socket());
            remove_guest_net(&self.layout);
            if let Err(e) = share::remove(&self.layout.share_dir(), &self.layout.rootfs_mount()) {
                log::warn!("{e}");
            }
        }
        code
    }
}
