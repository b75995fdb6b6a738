//! The executor libcontainer runs in the container's init just before the workload's
//! `execve`, shared by the host container backend (`husk --isolation container`) and the
//! guest agent.
//!
//! Why it exists: signal dispositions set to "ignore" and the blocked-signal mask survive
//! `fork` and `execve`. Rust programs ignore SIGPIPE from their first instruction, and
//! libcontainer starts the container's process from the calling process, so without a
//! reset every container would start with SIGPIPE ignored (`yes | head` would not end
//! `yes` by signal) and with whatever else its starter ignored or blocked (a shell job
//! that ignores SIGTERM would pass that on, so `kill` would do nothing). runc's processes
//! start with default dispositions and an empty mask; so do husk's.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use oci_spec::runtime::Spec;

/// [`DefaultExecutor`] preceded by a reset of every signal to its default action and an
/// empty signal mask, as a freshly started process expects.
#[derive(Clone, Default)]
pub struct CleanSignalsExecutor;

impl Executor for CleanSignalsExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        reset_signals().map_err(|e| {
            ExecutorError::Execution(format!("resetting signal dispositions: {e}").into())
        })?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Every catchable signal back to `SIG_DFL`, and nothing blocked.
///
/// Real-time signals are reset too; the two that the C library keeps for its threads
/// (32 and 33 with glibc) refuse a new action and are left as they are.
pub fn reset_signals() -> nix::Result<()> {
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        set_default(signal as libc::c_int)?;
    }
    for signal in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        match set_default(signal) {
            Ok(()) | Err(nix::Error::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

fn set_default(signal: libc::c_int) -> nix::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags, SIG_DFL).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    // SAFETY: SIG_DFL runs no code of ours in a signal context, and this process is about
    // to exec; the pointers are valid for the call.
    let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
    nix::Error::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};

    use super::*;

    /// The `SigIgn` and `SigBlk` masks of /proc/self/status.
    fn ignored_and_blocked() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        (field("SigIgn:"), field("SigBlk:"))
    }

    #[test]
    fn ignored_and_blocked_signals_are_reset() {
        // In a child, so the test harness keeps its own dispositions.
        // SAFETY: the child only makes async-signal-safe calls and reads a file, then
        // exits with _exit; the harness's other threads are not touched.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
                // SAFETY: SIG_IGN runs no code.
                unsafe { sigaction(Signal::SIGTERM, &ignore) }.unwrap();
                let mut usr1 = SigSet::empty();
                usr1.add(Signal::SIGUSR1);
                usr1.thread_block().unwrap();
                let before = ignored_and_blocked();
                reset_signals().unwrap();
                let after = ignored_and_blocked();
                let term = 1u64 << (Signal::SIGTERM as i32 - 1);
                // Bits of the standard signals 1..=31 (above: the C library's own).
                let standard = (1u64 << 31) - 1;
                let ok = before.0 & term != 0
                    && before.1 != 0
                    && after.0 & standard == 0
                    && after.1 & standard == 0;
                // SAFETY: _exit ends the child without running the harness's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "SIGTERM ignored and SIGUSR1 blocked before, nothing ignored or blocked after"
                );
            }
        }
    }
}
