//! The daemon's main sequence: share, guest, container at the exec barrier, stdio
//! relays, control thread, `ok PID` on the ready pipe; then wait for the container's
//! init, drain its output, shut the guest down and exit with the init's exit code.

use std::os::fd::RawFd;
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
struct Running {
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
    if let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log())
    {
        super::logger::init(file);
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

fn backend(config: &DaemonConfig, netns: Option<PathBuf>) -> Box<dyn GuestBackend> {
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
fn remove_guest_net(layout: &Layout) {
    if let Err(e) = crate::net::guest::cleanup(&layout.run_dir(), &layout.name_files()) {
        log::warn!("{e}");
    }
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
    let bundle = Bundle::load(&config.bundle).map_err(|e| DaemonError::Io {
        what: "loading the bundle",
        path: config.bundle.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut spec = bundle.spec.clone();
    let process = spec.process().as_ref().ok_or(DaemonError::NoProcess)?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && config.console_socket.is_none() {
        return Err(DaemonError::NoConsoleSocket);
    }
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    if readonly {
        share::create_mount_points(&config.rootfs, spec.mounts().as_deref().unwrap_or(&[]))?;
    }
    share::prepare(
        &layout.share_dir(),
        &layout.rootfs_mount(),
        &config.rootfs,
        readonly,
    )?;
    let netns = match guest_spec(config, &layout, &mut spec) {
        Ok(netns) => netns,
        Err(e) => {
            let _ = share::remove(&layout.share_dir(), &layout.rootfs_mount());
            return Err(e);
        }
    };
    let mut guest = backend(config, netns);
    let started = (|| {
        let address = guest.start(&layout.share_dir(), &run_dir)?;
        let json = serde_json::to_vec(&address).expect("addresses serialize");
        std::fs::write(layout.guest_file(), json)
            .map_err(io_err("writing", &layout.guest_file()))?;
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
        let relays = match &config.console_socket {
            Some(socket) if terminal => relay::attach_pty(&*connector, spawned.stdio, socket)?,
            _ => relay::attach_pipes(&*connector, spawned.stdio)?,
        };
        let waiter =
            AgentClient::connect(&*connector).map_err(agent_err("connecting to the agent"))?;
        let listener = control::bind(&layout.control_socket())?;
        Ok((connector, relays, waiter, listener))
    })();
    let (connector, relays, waiter, listener) = match started {
        Ok(parts) => parts,
        Err(e) => {
            guest.stop();
            remove_guest_net(&layout);
            let _ = share::remove(&layout.share_dir(), &layout.rootfs_mount());
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
fn seccomp_mode(config: &DaemonConfig) -> SeccompMode {
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
    fn wait(mut self) -> i32 {
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
        // A confined daemon may not unlink or unmount (no rule allows it): `husk delete`
        // removes the socket and the share mount, as it does after a crashed daemon.
        if matches!(seccomp::process_mode(), None | Some(SeccompMode::Off)) {
            let _ = std::fs::remove_file(self.layout.control_socket());
            remove_guest_net(&self.layout);
            if let Err(e) = share::remove(&self.layout.share_dir(), &self.layout.rootfs_mount()) {
                log::warn!("{e}");
            }
        }
        code
    }
}
