//! A booted guest with its agent: what a sandbox needs from the VMM.
//!
//! [`GuestVm::boot`] builds a VM with a hybrid vsock device and one virtio-fs share
//! (`share_dir`, holding `<container id>/rootfs`), runs it on its own thread (the VM's
//! event loop drives the devices), waits for the agent's ready signal, and has the agent
//! mount the share at [`GUEST_SHARE_DIR`]. Then [`GuestVm::agent`] opens control
//! connections over the vsock socket.
//!
//! ```no_run
//! use husk::vmm::guest::{GuestVm, GuestVmConfig};
//! let vm = GuestVm::boot(GuestVmConfig::new("/run/husk/c1", "/run/husk/c1/share"))?;
//! let mut agent = vm.agent()?;
//! agent.ping()?;
//! // CreateContainer with rootfs = vm.guest_rootfs("c1") ...
//! vm.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_protocol::client::{AgentClient, ClientError};
use husk_protocol::connector::HybridVsockConnector;
use husk_protocol::messages::{NetInterface, NetworkConfig};

use super::builder::{BuildError, VmBuilder};
use super::config::{
    BootSource, FsBackend, FsShareConfig, NetDeviceConfig, VirtioDevicesConfig, VmConfig,
    VsockDeviceConfig,
};
use super::devices::serial::ConsoleOutput;
use super::devices::virtio::vsock::DEFAULT_GUEST_CID;
use super::template;
use super::vm::{GuestExit, RunError, RunOptions, Vm, VmOutcome, VmPauseHandle, VmStopHandle};
use crate::artifacts::{self, Artifact, ArtifactError};

/// The tag of the sandbox share.
pub const SHARE_TAG: &str = "husk-share";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/husk/share";
/// The vsock socket's name in the run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// virtiofsd's socket's name in the run directory.
pub const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
/// How long a guest gets to power off after the agent's `Shutdown` before it is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Waiting for the VM thread after a forced stop: it only has to join the vCPUs.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Errors booting or stopping a guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum GuestVmError {
    /// {0}
    Artifact(#[from] ArtifactError),
    /// run directory {0} does not exist; create it (it holds the VM's sockets)
    RunDir(PathBuf),
    /// share directory {0} does not exist; create it (it holds <container id>/rootfs)
    ShareDir(PathBuf),
    /// a stale socket {path} cannot be removed: {source}
    StaleSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    /// building the VM failed: {0}
    Build(Box<BuildError>),
    /// starting the VM thread failed: {0}
    Thread(#[source] std::io::Error),
    /// the VM failed: {0}
    Run(Box<RunError>),
    /// the guest ended ({0:?}) before its agent was ready; see the guest console
    EndedEarly(GuestExit),
    /// the VM thread did not end within {0:?} of being stopped
    Hung(Duration),
    /// the agent: {0}
    Agent(#[from] ClientError),
    /// {0}
    Refresh(#[from] template::RefreshError),
}

// Boxed: these are large, and errors travel through many `Result`s.
impl From<BuildError> for GuestVmError {
    fn from(e: BuildError) -> Self {
        GuestVmError::Build(Box::new(e))
    }
}

impl From<RunError> for GuestVmError {
    fn from(e: RunError) -> Self {
        GuestVmError::Run(Box::new(e))
    }
}

/// What to boot.
#[derive(Debug)]
pub struct GuestVmConfig {
    /// An existing directory for the VM's sockets (vsock, virtiofsd).
    pub run_dir: PathBuf,
    /// The host directory shared with the guest; containers' rootfs live in
    /// `<share_dir>/<container id>/rootfs`.
    pub share_dir: PathBuf,
    /// Explicit artifact paths; `None` looks them up (see [`crate::artifacts`]).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub console: ConsoleOutput,
    /// From VMM start to the agent's ready signal.
    pub ready_timeout: Duration,
    pub cmdline_extra: String,
    /// A NIC over a tap, configured by the agent once it is ready.
    pub net: Option<GuestNet>,
    /// Where templates are cached ([`super::template`]): the guest starts from the
    /// template of its configuration, made by this boot when there is none. `None`, or a
    /// NIC (a template has none), boots cold.
    pub template_dir: Option<PathBuf>,
    /// Restore from exactly this template and never make one (a jailed vmm: its launcher
    /// made the template, see [`GuestVm::template_state`]). Wins over `template_dir`.
    pub template_file: Option<PathBuf>,
    /// A virtiofsd already started on `share_dir` and connected (a jailed vmm's, started
    /// by its launcher); `None` starts one per VM.
    pub virtiofsd_connection: Option<std::sync::Arc<std::os::unix::net::UnixStream>>,
}

/// What [`GuestVm::template_state`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateState {
    /// Templates are off, or the guest has a NIC (a template has none): boot cold.
    NotUsed,
    /// A template to restore from.
    Ready(PathBuf),
    /// None yet: make it here.
    Missing(PathBuf),
    /// It was unusable and is removed: boot cold.
    Removed,
}

/// The guest's NIC: the device and what the agent makes of it (`ConfigureNetwork`).
#[derive(Debug)]
pub struct GuestNet {
    pub device: NetDeviceConfig,
    pub interface: NetInterface,
}

impl GuestVmConfig {
    pub fn new(run_dir: impl Into<PathBuf>, share_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            share_dir: share_dir.into(),
            kernel: None,
            initrd: None,
            virtiofsd: None,
            vcpus: 1,
            mem_mib: super::config::DEFAULT_MEM_MIB,
            console: ConsoleOutput::Log,
            ready_timeout: Duration::from_secs(300),
            cmdline_extra: String::new(),
            net: None,
            template_dir: None,
            template_file: None,
            virtiofsd_connection: None,
        }
    }

    /// The template file for this configuration, if templates are on and apply (no NIC).
    fn template_path(&self) -> Result<Option<PathBuf>, GuestVmError> {
        if let Some(file) = &self.template_file {
            return Ok(Some(file.clone()));
        }
        match (&self.template_dir, &self.net) {
            (Some(dir), None) => Ok(Some(
                template::path_for(dir, &self.vm_config()?)
                    .map_err(|e| GuestVmError::Build(Box::new(e.into())))?,
            )),
            _ => Ok(None),
        }
    }

    fn share_backend(&self) -> Result<FsBackend, GuestVmError> {
        Ok(match &self.virtiofsd_connection {
            Some(stream) => FsBackend::Connected {
                stream: stream.clone(),
            },
            None => FsBackend::Spawn {
                virtiofsd: artifacts::locate(Artifact::Virtiofsd, self.virtiofsd.as_deref())?,
            },
        })
    }

    fn vm_config(&self) -> Result<VmConfig, GuestVmError> {
        if !self.run_dir.is_dir() {
            return Err(GuestVmError::RunDir(self.run_dir.clone()));
        }
        // A connected virtiofsd serves a directory this process may not see (a jail).
        if self.virtiofsd_connection.is_none() && !self.share_dir.is_dir() {
            return Err(GuestVmError::ShareDir(self.share_dir.clone()));
        }
        let vsock_path = self.run_dir.join(VSOCK_SOCKET);
        remove_stale_socket(&vsock_path)?;
        let devices = VirtioDevicesConfig {
            vsock: Some(VsockDeviceConfig {
                uds_path: vsock_path,
                guest_cid: DEFAULT_GUEST_CID,
            }),
            shares: vec![FsShareConfig {
                tag: SHARE_TAG.into(),
                dir: self.share_dir.clone(),
                backend: self.share_backend()?,
                socket_path: self.run_dir.join(VIRTIOFSD_SOCKET),
            }],
            net: self.net.as_ref().map(|n| n.device.clone()),
        };
        let mut config = VmConfig::new(BootSource::Linux {
            kernel: artifacts::locate(Artifact::Kernel, self.kernel.as_deref())?,
            initrd: Some(artifacts::locate(Artifact::Initrd, self.initrd.as_deref())?),
            cmdline_extra: self.cmdline_extra.clone(),
        });
        config.vcpus = self.vcpus;
        config.mem_mib = self.mem_mib;
        config.console = self.console.clone();
        config.devices = devices;
        Ok(config)
    }
}

/// A socket left by a VMM that was killed would make the bind fail; anything else at
/// that path is not ours to remove (the bind then fails with a clear error).
fn remove_stale_socket(path: &Path) -> Result<(), GuestVmError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| GuestVmError::StaleSocket {
                path: path.to_path_buf(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// A running guest whose agent is ready. Dropping it stops the VM (devices, virtiofsd
/// and sockets go with it).
pub struct GuestVm {
    connector: HybridVsockConnector,
    share_dir: PathBuf,
    started_at: Instant,
    ready_after: Duration,
    stop: VmStopHandle,
    pause: VmPauseHandle,
    done: Receiver<Result<VmOutcome, RunError>>,
    thread: Option<JoinHandle<()>>,
    from_template: bool,
}

/// How [`GuestVm::run`] got its VM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Cold,
    Restored,
}

/// Boots a VM of `config` to agent ready, saves it as the template at `path` and stops
/// it. The sandbox then restores from the template like every later one: a guest that
/// runs on after being snapshotted misbehaved here (processes started in it later failed
/// or crashed), while restored guests do not.
fn make_template(config: &GuestVmConfig, path: &Path) -> Result<(), GuestVmError> {
    let mut vm = VmBuilder::new(config.vm_config()?)?.start()?;
    let outcome = vm.wait_then_pause(RunOptions {
        until_ready: true,
        ready_timeout: Some(config.ready_timeout),
    })?;
    if !matches!(outcome.exit, GuestExit::Ready) {
        return Err(GuestVmError::EndedEarly(outcome.exit));
    }
    let t0 = Instant::now();
    template::save(&vm, path)?;
    log::info!(
        "template {} made: ready after {:?}, saved in {} ms",
        path.display(),
        outcome.ready_after.unwrap_or_default(),
        t0.elapsed().as_millis()
    );
    Ok(())
}

impl GuestVm {
    /// Boots the VM, or restores it from its template ([`GuestVmConfig::template_dir`]),
    /// and returns once the agent is ready and has mounted the share.
    pub fn boot(config: GuestVmConfig) -> Result<Self, GuestVmError> {
        let template = config.template_path()?;
        if let Some(path) = &template {
            if !path.exists() && config.template_file.is_none() {
                if let Err(e) = make_template(&config, path) {
                    log::warn!("making template {}: {e}; booting cold", path.display());
                    return Self::boot_cold(&config);
                }
            }
            match VmBuilder::restore(config.vm_config()?, path).and_then(VmBuilder::start) {
                Ok(vm) => return Self::run(vm, &config, Start::Restored),
                Err(BuildError::Snapshot(e)) if e.snapshot_unusable() => {
                    // Removed, so the next sandbox makes it again.
                    log::warn!(
                        "template {} is unusable ({e}): removed; booting cold",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Self::boot_cold(&config)
    }

    /// Where this configuration's template stands (for a jail's launcher, which makes it
    /// in a process of its own and hands the file to the jailed vmm). A damaged or foreign
    /// file is removed here, because the jailed vmm could not remove it (its jail holds a
    /// read-only link): that sandbox boots cold and the next one makes it again, as after
    /// an unjailed restore that refused it.
    pub fn template_state(config: &GuestVmConfig) -> Result<TemplateState, GuestVmError> {
        let Some(path) = config.template_path()? else {
            return Ok(TemplateState::NotUsed);
        };
        if !path.exists() {
            return Ok(TemplateState::Missing(path));
        }
        match super::snapshot::file::read(&path) {
            Ok(_) => Ok(TemplateState::Ready(path)),
            Err(e) if e.snapshot_unusable() => {
                log::warn!(
                    "template {} is unusable ({e}): removed; booting cold",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                Ok(TemplateState::Removed)
            }
            Err(e) => Err(GuestVmError::Build(Box::new(e.into()))),
        }
    }

    /// Boots a VM of `config` to agent ready and saves it as the template at `path` (see
    /// [`GuestVm::template_state`]). Only husk's kernel and agent have run in that guest
    /// when it is saved: no container, no share mounted.
    pub fn make_template(config: &GuestVmConfig, path: &Path) -> Result<(), GuestVmError> {
        make_template(config, path)
    }

    fn boot_cold(config: &GuestVmConfig) -> Result<Self, GuestVmError> {
        let vm = VmBuilder::new(config.vm_config()?)?.start()?;
        Self::run(vm, config, Start::Cold)
    }

    /// Runs `vm` on its own thread and gets its agent ready for containers.
    fn run(mut vm: Vm, config: &GuestVmConfig, start: Start) -> Result<Self, GuestVmError> {
        let ready_timeout = config.ready_timeout;
        let started_at = vm.started_at();
        let (ready_tx, ready_rx) = channel();
        let stop = vm.stop_handle().map_err(GuestVmError::Thread)?;
        let pause = vm.pause_handle();
        let (done_tx, done) = channel();
        let restored = start == Start::Restored;
        vm.notify_ready(ready_tx);
        let opts = RunOptions {
            until_ready: false,
            ready_timeout: Some(ready_timeout),
        };
        let thread = std::thread::Builder::new()
            .name("husk-vmm".into())
            .spawn(move || {
                // This thread runs the event loop; the vCPU threads filtered themselves.
                let result =
                    match crate::seccomp::install_configured(crate::seccomp::ThreadKind::EventLoop)
                    {
                        Ok(()) => vm.wait(opts),
                        Err(e) => Err(RunError::EventLoop(e.into())),
                    };
                // Drop the VM (and with it the vsock streams and virtiofsd) before
                // reporting, so whoever sees the result sees the host ends closed.
                drop(vm);
                let _ = done_tx.send(result);
            })
            .map_err(GuestVmError::Thread)?;
        let mut guest = Self {
            connector: HybridVsockConnector::new(config.run_dir.join(VSOCK_SOCKET)),
            share_dir: config.share_dir.clone(),
            started_at,
            ready_after: Duration::ZERO,
            stop,
            pause,
            done,
            thread: Some(thread),
            from_template: restored,
        };
        if restored {
            // The agent was ready when the template was taken.
            let mut agent = guest.agent()?;
            template::refresh(&mut agent)?;
            guest.ready_after = started_at.elapsed();
        } else {
            // The event loop enforces the ready deadline; the margin only guards against
            // a VM thread that never reports.
            match ready_rx.recv_timeout(ready_timeout + STOP_WAIT) {
                Ok(after) => guest.ready_after = after,
                Err(_) => return Err(guest.ended_before_ready()),
            }
        }
        let mut agent = guest.agent()?;
        agent.mount_share(SHARE_TAG, GUEST_SHARE_DIR, false)?;
        if let Some(net) = &config.net {
            agent.configure_network(NetworkConfig {
                interfaces: vec![net.interface.clone()],
            })?;
        }
        Ok(guest)
    }

    /// Whether the guest was restored from a template rather than booted.
    pub fn started_from_template(&self) -> bool {
        self.from_template
    }

    fn ended_before_ready(mut self) -> GuestVmError {
        match self.stop_and_wait() {
            Ok(outcome) => GuestVmError::EndedEarly(outcome.exit),
            Err(e) => e,
        }
    }

    /// A new control connection to the agent (after the `Hello` exchange).
    pub fn agent(&self) -> Result<AgentClient, ClientError> {
        AgentClient::connect(&self.connector)
    }

    /// The connector for the agent's ports (control and stdio streams).
    pub fn connector(&self) -> &HybridVsockConnector {
        &self.connector
    }

    /// The host directory shared with the guest.
    pub fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    /// Where the host puts container `id`'s rootfs.
    pub fn host_rootfs(&self, id: &str) -> PathBuf {
        self.share_dir.join(id).join("rootfs")
    }

    /// The same rootfs as the agent sees it (for `CreateContainer`).
    pub fn guest_rootfs(&self, id: &str) -> PathBuf {
        Path::new(GUEST_SHARE_DIR).join(id).join("rootfs")
    }

    /// When the VMM started.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Time from VMM start to the agent's ready signal.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Freezes the guest: every vCPU leaves the guest and waits (devices keep running,
    /// so the agent does not answer until [`GuestVm::resume`]).
    pub fn pause(&self) -> Result<(), GuestVmError> {
        Ok(self.pause.pause()?)
    }

    /// Lets a paused guest run again (a no-op for a running one).
    pub fn resume(&self) -> Result<(), GuestVmError> {
        Ok(self.pause.resume()?)
    }

    /// A handle another thread can use to pause and resume this guest.
    pub fn pause_handle(&self) -> VmPauseHandle {
        self.pause.clone()
    }

    /// Waits up to `timeout` for the VM to end on its own; `Ok(None)` if it still runs.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<VmOutcome>, GuestVmError> {
        match self.done.recv_timeout(timeout) {
            Ok(result) => {
                self.join();
                Ok(Some(result?))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.join();
                Err(GuestVmError::Hung(timeout))
            }
        }
    }

    /// Asks the agent to power the guest off; stops the VM if it has not ended within
    /// 30 s (or the agent cannot be reached). A paused guest is resumed first: its agent
    /// could not answer.
    pub fn shutdown(mut self) -> Result<VmOutcome, GuestVmError> {
        if let Err(e) = self.resume() {
            log::warn!("resuming the guest before its shutdown: {e}");
        }
        let asked = self.agent().and_then(|mut agent| agent.shutdown());
        if let Err(e) = &asked {
            log::warn!("agent shutdown failed, stopping the VM: {e}");
        } else if let Some(outcome) = self.wait(SHUTDOWN_GRACE)? {
            return Ok(outcome);
        }
        self.stop_and_wait()
    }

    /// Stops the VM now, without asking the guest.
    pub fn kill(mut self) -> Result<VmOutcome, GuestVmError> {
        self.stop_and_wait()
    }

    fn stop_and_wait(&mut self) -> Result<VmOutcome, GuestVmError> {
        if self.thread.is_none() {
            return Err(GuestVmError::Hung(Duration::ZERO));
        }
        // The VM thread may have ended already; then the write has nobody to wake.
        let _ = self.stop.stop();
        self.wait(STOP_WAIT)?.ok_or(GuestVmError::Hung(STOP_WAIT))
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the VM thread panicked");
            }
        }
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.stop_and_wait() {
                log::error!("stopping the guest VM: {e}");
            }
        }
    }
}
