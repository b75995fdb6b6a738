//! A running VM: vCPU threads started, the VMM thread waiting in its event loop for the
//! guest to become ready, power off, or fail.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::builder::{LegacyDevices, MmioSlot};
use super::device_set::{DeviceEvent, DeviceSet, DeviceSetError, Handled};
use super::devices::serial::SerialDevice;
use super::event_loop::{EventLoop, EventLoopError};
use super::snapshot::{self, Fingerprint, SnapshotError};
use super::vcpu::{VcpuCommand, VcpuError, VcpuHandle, VcpuState, VcpuStop, VcpuStopReport};

/// Errors while the VM runs.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RunError {
    /// {0}
    EventLoop(#[from] EventLoopError),
    /// {0}
    Vcpu(#[from] VcpuError),
    /// snapshot: {0}
    Snapshot(#[from] SnapshotError),
    /// {0}; the VM was stopped
    Device(#[from] DeviceSetError),
    /// vCPU {index} stopped: {reason}{hint}
    VcpuFailed {
        index: u8,
        reason: VcpuStop,
        hint: &'static str,
    },
    /// the guest did not signal ready within {0:?}; raise --timeout, or look at the console output for where it stopped
    NotReady(Duration),
    /// vCPU {index} answered {state:?} to {cmd:?}
    Command {
        index: u8,
        cmd: VcpuCommand,
        state: VcpuState,
    },
    /// the VM is not running any more (its event loop has ended)
    NotRunning,
    /// waking the VMM thread failed: {0}
    Wake(#[source] std::io::Error),
    /// the VMM thread did not answer a {0:?} within {1:?}
    NoAnswer(PauseRequest, Duration),
}

const EMULATION_HINT: &str = "; look the rip up in the System.map next to the guest's vmlinux \
    (on PVM hosts the guest kernel is emulated and the emulator lacks some instructions, \
    see docs/design.md)";

/// How long to wait and when to stop.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Return as soon as the guest signals ready (the VM is stopped).
    pub until_ready: bool,
    /// Fail if the guest has not signalled ready by then (counted from VMM start).
    pub ready_timeout: Option<Duration>,
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset or powered off (i8042 reset, or a KVM shutdown/reset event).
    PowerOff,
    /// Stopped by the VMM right after the ready signal (`until_ready`).
    Ready,
    /// Stopped by the host through a [`VmStopHandle`].
    Stopped,
}

/// Asks a running [`Vm::wait`] (on another thread) to stop the VM.
#[derive(Debug)]
pub struct VmStopHandle(EventFd);

impl VmStopHandle {
    pub fn stop(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a [`VmPauseHandle`] asks of the VMM thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseRequest {
    Pause,
    Resume,
}

/// How long a [`VmPauseHandle`] waits for the VMM thread (each vCPU answers within 5 s).
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// A request and where its answer goes.
type PauseCall = (PauseRequest, Sender<Result<(), RunError>>);

/// The VMM thread's end of the pause handles.
pub(super) struct PauseChannel {
    wake: Arc<EventFd>,
    requests: Sender<PauseCall>,
    pending: Receiver<PauseCall>,
}

impl PauseChannel {
    pub(super) fn new() -> std::io::Result<Self> {
        let (requests, pending) = channel();
        Ok(Self {
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            requests,
            pending,
        })
    }
}

/// Pauses and resumes the vCPUs of a VM whose [`Vm::wait`] runs on another thread: the
/// VMM thread does it and the handle waits for the answer (at most 30 s). Devices keep
/// running while the vCPUs are paused.
#[derive(Debug, Clone)]
pub struct VmPauseHandle {
    wake: Arc<EventFd>,
    requests: Sender<PauseCall>,
}

impl VmPauseHandle {
    /// Takes every vCPU out of the guest and holds it.
    pub fn pause(&self) -> Result<(), RunError> {
        self.call(PauseRequest::Pause)
    }

    /// Lets paused vCPUs run again (a no-op for running ones).
    pub fn resume(&self) -> Result<(), RunError> {
        self.call(PauseRequest::Resume)
    }

    fn call(&self, request: PauseRequest) -> Result<(), RunError> {
        let (tx, rx) = channel();
        self.requests
            .send((request, tx))
            .map_err(|_| RunError::NotRunning)?;
        self.wake.write(1).map_err(RunError::Wake)?;
        match rx.recv_timeout(PAUSE_WAIT) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(RunError::NoAnswer(request, PAUSE_WAIT)),
            // The VM was dropped with the request unanswered: its event loop had ended.
            Err(RecvTimeoutError::Disconnected) => Err(RunError::NotRunning),
        }
    }
}

/// The result of running a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOutcome {
    pub exit: GuestExit,
    /// Time from VMM start to the guest's ready signal, if it came.
    pub ready_after: Option<Duration>,
}

/// What the builder hands over.
pub(super) struct VmParts {
    pub start: Instant,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub stops: Receiver<VcpuStopReport>,
    pub stop_evt: EventFd,
    pub legacy: LegacyDevices,
    pub console_input: bool,
    pub mmio_slots: Vec<MmioSlot>,
    /// The configuration's identity, written into snapshots.
    pub fingerprint: Fingerprint,
    pub devices: DeviceSet,
    /// Written by [`VmStopHandle::stop`].
    pub host_stop: EventFd,
    /// Requests of [`VmPauseHandle`]s.
    pub pause: PauseChannel,
    /// Told the time to ready when the guest signals it.
    pub ready_notify: Option<Sender<Duration>>,
}

/// A started VM. Dropping it stops the vCPUs.
pub struct Vm {
    parts: VmParts,
}

const TOKEN_VCPU_STOP: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_READY: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_HOST_STOP: u64 = 5;
const TOKEN_PAUSE: u64 = 6;
/// Device events get `DEVICE_TOKENS + their index` in the event source table.
const DEVICE_TOKENS: u64 = 0x100;

enum Step {
    Continue,
    Done(GuestExit),
}

impl Vm {
    pub(super) fn new(parts: VmParts) -> Self {
        Self { parts }
    }

    /// Guest memory (tests read what guest programs wrote).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.parts.mem
    }

    /// The VM fd (e.g. for KVM_GET_STATS_FD exit counters).
    pub fn vm_fd(&self) -> &VmFd {
        &self.parts.vm
    }

    /// The virtio-mmio devices placed on the bus.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.parts.mmio_slots
    }

    /// When the VMM started (time to ready counts from here).
    pub fn started_at(&self) -> Instant {
        self.parts.start
    }

    /// Time to ready, if the guest signalled it.
    pub fn ready_after(&self) -> Option<Duration> {
        self.parts.legacy.ready_time.get().copied()
    }

    /// A handle another thread can use to stop [`Vm::wait`].
    pub fn stop_handle(&self) -> std::io::Result<VmStopHandle> {
        self.parts.host_stop.try_clone().map(VmStopHandle)
    }

    /// A handle another thread can use to pause and resume the vCPUs while [`Vm::wait`]
    /// runs (requests are served by the event loop).
    pub fn pause_handle(&self) -> VmPauseHandle {
        VmPauseHandle {
            wake: self.parts.pause.wake.clone(),
            requests: self.parts.pause.requests.clone(),
        }
    }

    /// `tx` is told the time to ready when the guest signals it (while [`Vm::wait`] runs).
    pub fn notify_ready(&mut self, tx: Sender<Duration>) {
        self.parts.ready_notify = Some(tx);
    }

    /// The serial device, e.g. to feed it input.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.parts.legacy.serial.clone()
    }

    fn command_all(&self, cmd: VcpuCommand, expect: VcpuState) -> Result<(), RunError> {
        for vcpu in &self.parts.vcpus {
            let state = vcpu.command(cmd)?;
            if state != expect {
                return Err(RunError::Command {
                    index: vcpu.index(),
                    cmd,
                    state,
                });
            }
        }
        Ok(())
    }

    /// Takes every vCPU out of the guest and holds it.
    pub fn pause(&self) -> Result<(), RunError> {
        self.command_all(VcpuCommand::Pause, VcpuState::Paused)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), RunError> {
        self.command_all(VcpuCommand::Resume, VcpuState::Running)
    }

    /// Like [`Vm::wait`], but on success the vCPUs are left paused instead of stopped, so
    /// the VM can be snapshotted (e.g. `until_ready` for a template) and resumed.
    pub fn wait_then_pause(&mut self, opts: RunOptions) -> Result<VmOutcome, RunError> {
        match self.event_loop(opts) {
            Ok(exit) => {
                self.pause()?;
                Ok(VmOutcome {
                    exit,
                    ready_after: self.ready_after(),
                })
            }
            Err(e) => {
                self.stop_vcpus();
                Err(e)
            }
        }
    }

    /// Writes a snapshot of this VM to `path` (see [`snapshot`]). The vCPUs are paused
    /// first and stay paused: [`Vm::resume`] continues this VM.
    pub fn snapshot(&self, path: &std::path::Path) -> Result<snapshot::Header, RunError> {
        if self.parts.vcpus.is_empty() {
            return Err(SnapshotError::Vcpu {
                index: 0,
                reason: "the vCPUs are gone (wait() returned); snapshot while the VM runs \
                    or after wait_then_pause()"
                    .into(),
            }
            .into());
        }
        self.pause()?;
        snapshot::vcpu::preload_msr_index_list()?;
        let vcpus = self
            .parts
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        let serial = self
            .parts
            .legacy
            .serial
            .lock()
            .expect("serial lock poisoned")
            .state();
        let devices = snapshot::DeviceInputs {
            serial,
            virtio_slots: self.parts.mmio_slots.len(),
            ready: self.ready_after().is_some(),
            virtio: self
                .parts
                .devices
                .transports()
                .map(|t| t.lock().expect("transport lock poisoned").state())
                .collect(),
            vsock_connections: self.parts.devices.vsock().map_or(0, |v| {
                v.lock().expect("vsock lock poisoned").connection_count()
            }),
        };
        Ok(snapshot::save(
            path,
            self.parts.fingerprint,
            &self.parts.vm,
            &self.parts.mem,
            vcpus,
            devices,
        )?)
    }

    /// Runs the event loop until the guest powers off, becomes ready (with
    /// `until_ready`), fails, or misses the ready deadline. The vCPUs are stopped after.
    pub fn wait(&mut self, opts: RunOptions) -> Result<VmOutcome, RunError> {
        let result = self.event_loop(opts);
        self.stop_vcpus();
        let exit = result?;
        Ok(VmOutcome {
            exit,
            ready_after: self.ready_after(),
        })
    }

    fn event_loop(&mut self, opts: RunOptions) -> Result<GuestExit, RunError> {
        let events = EventLoop::new()?;
        events.add(self.parts.stop_evt.as_raw_fd(), TOKEN_VCPU_STOP)?;
        events.add(self.parts.legacy.reset_evt.as_raw_fd(), TOKEN_RESET)?;
        events.add(self.parts.legacy.ready_evt.as_raw_fd(), TOKEN_READY)?;
        events.add(self.parts.host_stop.as_raw_fd(), TOKEN_HOST_STOP)?;
        events.add(self.parts.pause.wake.as_raw_fd(), TOKEN_PAUSE)?;
        if self.parts.console_input {
            events.add(libc::STDIN_FILENO, TOKEN_STDIN)?;
        }
        let device_events = self.parts.devices.event_sources();
        for (i, (fd, _)) in device_events.iter().enumerate() {
            events.add(*fd, DEVICE_TOKENS + i as u64)?;
        }
        let deadline = opts.ready_timeout.map(|t| self.parts.start + t);
        loop {
            let wait_until = if self.ready_after().is_some() {
                None
            } else {
                deadline
            };
            let tokens = events.wait(wait_until)?;
            if tokens.is_empty() && self.ready_after().is_none() {
                return Err(RunError::NotReady(opts.ready_timeout.unwrap_or_default()));
            }
            // Ready first: a guest that signals ready and powers off at once was ready.
            let mut ordered = tokens;
            ordered.sort_by_key(|t| if *t == TOKEN_READY { 0 } else { 1 });
            for token in ordered {
                if token >= DEVICE_TOKENS {
                    let index = (token - DEVICE_TOKENS) as usize;
                    if let Some(&(fd, ev)) = device_events.get(index) {
                        self.device_event(&events, fd, ev)?;
                    }
                    continue;
                }
                if let Step::Done(exit) = self.handle(token, opts, &events)? {
                    return Ok(exit);
                }
            }
        }
    }

    fn handle(
        &mut self,
        token: u64,
        opts: RunOptions,
        events: &EventLoop,
    ) -> Result<Step, RunError> {
        match token {
            TOKEN_READY => {
                let _ = self.parts.legacy.ready_evt.read();
                if let (Some(tx), Some(after)) =
                    (self.parts.ready_notify.take(), self.ready_after())
                {
                    let _ = tx.send(after);
                }
                if opts.until_ready {
                    return Ok(Step::Done(GuestExit::Ready));
                }
            }
            TOKEN_RESET => {
                let _ = self.parts.legacy.reset_evt.read();
                return Ok(Step::Done(GuestExit::PowerOff));
            }
            TOKEN_VCPU_STOP => {
                let _ = self.parts.stop_evt.read();
                if let Ok(report) = self.parts.stops.try_recv() {
                    return self.vcpu_stopped(report).map(Step::Done);
                }
            }
            TOKEN_STDIN => self.forward_stdin(events),
            TOKEN_HOST_STOP => {
                let _ = self.parts.host_stop.read();
                return Ok(Step::Done(GuestExit::Stopped));
            }
            TOKEN_PAUSE => self.serve_pause_requests(),
            _ => {}
        }
        Ok(Step::Continue)
    }

    fn serve_pause_requests(&self) {
        let _ = self.parts.pause.wake.read();
        while let Ok((request, answer)) = self.parts.pause.pending.try_recv() {
            let result = match request {
                // Half a pause is no state to leave the VM in: let the others run again.
                PauseRequest::Pause => self.pause().inspect_err(|_| {
                    let _ = self.resume();
                }),
                PauseRequest::Resume => self.resume(),
            };
            // The caller may have given up waiting; the result is then nobody's.
            let _ = answer.send(result);
        }
    }

    fn device_event(
        &mut self,
        events: &EventLoop,
        fd: i32,
        event: DeviceEvent,
    ) -> Result<(), RunError> {
        if let Handled::StopPolling(fd) = self.parts.devices.handle(event, fd)? {
            events.remove(fd);
        }
        Ok(())
    }

    fn vcpu_stopped(&self, report: VcpuStopReport) -> Result<GuestExit, RunError> {
        match report.reason {
            VcpuStop::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET) => {
                Ok(GuestExit::PowerOff)
            }
            reason => {
                let hint = if matches!(reason, VcpuStop::InternalError(_)) {
                    EMULATION_HINT
                } else {
                    ""
                };
                Err(RunError::VcpuFailed {
                    index: report.index,
                    reason,
                    hint,
                })
            }
        }
    }

    fn forward_stdin(&self, events: &EventLoop) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => events.remove(libc::STDIN_FILENO),
            Ok(n) => {
                let mut serial = self
                    .parts
                    .legacy
                    .serial
                    .lock()
                    .expect("serial lock poisoned");
                // A full FIFO drops the rest, as a real UART would.
                serial.enqueue_input(&buf[..n]);
            }
        }
    }

    fn stop_vcpus(&mut self) {
        for vcpu in self.parts.vcpus.drain(..) {
            vcpu.stop_and_join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
