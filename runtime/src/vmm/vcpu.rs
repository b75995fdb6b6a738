//! vCPU threads. Each vCPU runs `KVM_RUN` on its own thread, routes port and MMIO exits to
//! the buses, and obeys typed commands (pause, resume, stop). A command is followed by a
//! real-time signal that kicks the thread out of `KVM_RUN`: the handler sets the
//! vCPU's `immediate_exit`, so a signal landing just before `KVM_RUN` is not lost either.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::devices::Bus;
use super::snapshot::{self, SnapshotError};

/// Errors controlling vCPU threads.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VcpuError {
    /// registering the vCPU kick signal handler failed: {0}
    SignalHandler(vmm_sys_util::errno::Error),
    /// starting the thread of vCPU {index} failed: {source}
    Spawn { index: u8, source: std::io::Error },
    /// vCPU {0} thread is gone
    Gone(u8),
    /// vCPU {0} did not answer a {1:?} command within 5 s
    NoAnswer(u8, VcpuCommand),
    /// vCPU {0} must be paused to save its state
    NotPaused(u8),
    /// saving vCPU {index}: {source}
    Save { index: u8, source: SnapshotError },
}

/// Where a vCPU thread leaves its saved state for the VMM thread.
type SavedState = Arc<Mutex<Option<Result<snapshot::VcpuState, SnapshotError>>>>;

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave KVM_RUN and wait for Resume or Stop.
    Pause,
    /// Continue running the guest.
    Resume,
    /// Leave KVM_RUN and end the thread.
    Stop,
    /// While paused: save the vCPU's state for a snapshot ([`VcpuHandle::save_state`]).
    SaveState,
}

/// What a vCPU thread answers to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Paused,
    Running,
    Stopped,
}

/// Why a vCPU stopped on its own. Everything but the guest's own shutdown is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// HLT with interrupts handled in user space (never with the in-kernel irqchip).
    Halted,
    /// Triple fault or similar: KVM_EXIT_SHUTDOWN.
    Shutdown,
    /// KVM_EXIT_SYSTEM_EVENT of this type (shutdown, reset, crash).
    SystemEvent(u32),
    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    InternalError(InternalErrorInfo),
    /// KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry { reason: u64 },
    /// Any other exit or ioctl failure.
    Unexpected(String),
}

/// What we know about an emulation failure, for the user and for System.map lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalErrorInfo {
    pub suberror: u32,
    pub data: Vec<u64>,
    pub rip: u64,
    pub cpl: u8,
    /// Up to 15 bytes at rip, read through the guest's page tables.
    pub instruction: Vec<u8>,
}

impl std::fmt::Display for InternalErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: Vec<String> = self
            .instruction
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let data: Vec<String> = self.data.iter().map(|d| format!("{d:#x}")).collect();
        write!(
            f,
            "KVM_EXIT_INTERNAL_ERROR suberror {} at rip {:#x} (CPL{}), instruction bytes [{}], data [{}]",
            self.suberror,
            self.rip,
            self.cpl,
            bytes.join(" "),
            data.join(", ")
        )
    }
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::Halted => write!(f, "halted"),
            VcpuStop::Shutdown => write!(f, "shut down (triple fault)"),
            VcpuStop::SystemEvent(t) => write!(f, "system event {t}"),
            VcpuStop::InternalError(info) => write!(f, "{info}"),
            VcpuStop::FailEntry { reason } => {
                write!(f, "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}")
            }
            VcpuStop::Unexpected(what) => write!(f, "{what}"),
        }
    }
}

/// A vCPU's report to the VMM that it stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStopReport {
    pub index: u8,
    pub reason: VcpuStop,
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    /// Where to report a stop, and the eventfd that wakes the VMM's event loop.
    pub stops: Sender<VcpuStopReport>,
    pub stop_evt: EventFd,
}

/// The VMM's side of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuCommand>,
    states: Receiver<VcpuState>,
    saved: SavedState,
    thread: Option<JoinHandle<()>>,
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    // The running vCPU's `kvm_run.immediate_exit`, for the signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer was set by this thread to a byte of its own kvm_run mapping,
        // which lives as long as the thread's VcpuFd; a volatile byte store is
        // async-signal-safe.
        unsafe { ptr.write_volatile(1) };
    }
}

fn register_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result =
            register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

enum RunResult {
    Continue,
    Interrupted,
    Stop(VcpuStop),
}

impl Vcpu {
    /// Starts the vCPU on its own thread.
    pub fn spawn(self) -> Result<VcpuHandle, VcpuError> {
        register_kick_handler()?;
        let index = self.index;
        let (cmd_tx, cmd_rx) = channel();
        let (state_tx, state_rx) = channel();
        let saved = SavedState::default();
        let slot = saved.clone();
        let thread = std::thread::Builder::new()
            .name(format!("husk-vcpu{index}"))
            .spawn(move || self.thread_main(cmd_rx, state_tx, slot))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            commands: cmd_tx,
            states: state_rx,
            saved,
            thread: Some(thread),
        })
    }

    fn thread_main(
        mut self,
        commands: Receiver<VcpuCommand>,
        states: Sender<VcpuState>,
        saved: SavedState,
    ) {
        // The daemon serves this vCPU's KVM statistics (`husk inspect`) from its control
        // thread; the fd must be opened before the filter, which allows no such ioctl.
        if crate::seccomp::process_mode().is_some() {
            crate::inspect::kvm_stats::register_vcpu(self.index, &self.fd);
        }
        // Before the first KVM_RUN: the guest never runs on an unfiltered vCPU thread.
        if let Err(e) = crate::seccomp::install_configured(crate::seccomp::ThreadKind::Vcpu) {
            log::error!("{e}; vCPU {} does not run", self.index);
            let _ = self.stops.send(VcpuStopReport {
                index: self.index,
                reason: VcpuStop::Unexpected(e.to_string()),
            });
            let _ = self.stop_evt.write(1);
            while let Ok(cmd) = commands.recv() {
                let _ = states.send(VcpuState::Stopped);
                if cmd == VcpuCommand::Stop {
                    break;
                }
            }
            return;
        }
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        loop {
            if !self.obey_commands(&commands, &states, &saved) {
                break;
            }
            match self.run_once() {
                RunResult::Continue => {}
                RunResult::Interrupted => self.fd.set_kvm_immediate_exit(0),
                RunResult::Stop(reason) => {
                    let _ = self.stops.send(VcpuStopReport {
                        index: self.index,
                        reason,
                    });
                    let _ = self.stop_evt.write(1);
                    // Stay around until told to stop, so pause/resume answers keep flowing.
                    while let Ok(cmd) = commands.recv() {
                        if cmd == VcpuCommand::Stop {
                            break;
                        }
                        let _ = states.send(VcpuState::Stopped);
                    }
                    let _ = states.send(VcpuState::Stopped);
                    break;
                }
            }
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Handles pending commands; returns false when the thread must end.
    fn obey_commands(
        &mut self,
        commands: &Receiver<VcpuCommand>,
        states: &Sender<VcpuState>,
        saved: &SavedState,
    ) -> bool {
        let mut paused = false;
        loop {
            let cmd = if paused {
                commands.recv().ok()
            } else {
                commands.try_recv().ok()
            };
            match cmd {
                None if paused => return false, // the VMM is gone
                None => return true,
                Some(VcpuCommand::Pause) => {
                    paused = true;
                    let _ = states.send(VcpuState::Paused);
                }
                Some(VcpuCommand::Resume) => {
                    paused = false;
                    let _ = states.send(VcpuState::Running);
                }
                Some(VcpuCommand::Stop) => {
                    let _ = states.send(VcpuState::Stopped);
                    return false;
                }
                // KVM state is read on the vCPU's own thread, as KVM expects.
                Some(VcpuCommand::SaveState) if paused => {
                    let state = snapshot::VcpuState::save(self.index, &mut self.fd);
                    *saved.lock().expect("vCPU state slot poisoned") = Some(state);
                    let _ = states.send(VcpuState::Paused);
                }
                Some(VcpuCommand::SaveState) => {
                    let _ = states.send(VcpuState::Running);
                }
            }
        }
    }

    fn run_once(&mut self) -> RunResult {
        let stop = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                return RunResult::Continue;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                return RunResult::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                return RunResult::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                return RunResult::Continue;
            }
            Ok(VcpuExit::Hlt) => VcpuStop::Halted,
            Ok(VcpuExit::Shutdown) => VcpuStop::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, _)) => VcpuStop::SystemEvent(kind),
            Ok(VcpuExit::InternalError) => VcpuStop::InternalError(self.internal_error_info()),
            Ok(VcpuExit::FailEntry(reason, _)) => VcpuStop::FailEntry { reason },
            Ok(VcpuExit::Intr) => return RunResult::Interrupted,
            Ok(other) => VcpuStop::Unexpected(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return RunResult::Interrupted
            }
            Err(e) => VcpuStop::Unexpected(format!("KVM_RUN failed: {e}")),
        };
        RunResult::Stop(stop)
    }

    fn internal_error_info(&mut self) -> InternalErrorInfo {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..ndata].to_vec();
        let (rip, cpl) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => (regs.rip.wrapping_add(sregs.cs.base), sregs.cs.dpl),
            _ => (0, 0),
        };
        InternalErrorInfo {
            suberror: internal.suberror,
            data,
            rip,
            cpl,
            instruction: self.instruction_bytes(rip),
        }
    }

    fn instruction_bytes(&self, linear: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(linear) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut bytes = vec![0u8; 15];
        // Stop at the end of guest memory rather than failing the whole read.
        match self.mem.read(&mut bytes, GuestAddress(t.physical_address)) {
            Ok(n) => bytes.truncate(n),
            Err(_) => bytes.clear(),
        }
        bytes
    }
}

const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `cmd`, kicks the thread out of KVM_RUN and waits for its answer.
    pub fn command(&self, cmd: VcpuCommand) -> Result<VcpuState, VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.kick();
        match self.states.recv_timeout(ANSWER_TIMEOUT) {
            Ok(state) => Ok(state),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::NoAnswer(self.index, cmd)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Saves the state of this paused vCPU (on its thread) and returns it.
    pub fn save_state(&self) -> Result<snapshot::VcpuState, VcpuError> {
        if self.command(VcpuCommand::SaveState)? != VcpuState::Paused {
            return Err(VcpuError::NotPaused(self.index));
        }
        let state = self.saved.lock().expect("vCPU state slot poisoned").take();
        state
            .ok_or(VcpuError::NotPaused(self.index))?
            .map_err(|source| VcpuError::Save {
                index: self.index,
                source,
            })
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = thread.kill(kick_signal());
        }
    }

    /// Stops the thread (if still running) and waits for it to end.
    pub fn stop_and_join(mut self) {
        let _ = self.commands.send(VcpuCommand::Stop);
        self.kick();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}
