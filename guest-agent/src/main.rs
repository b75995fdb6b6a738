//! `husk-agent`: PID 1 in the husk guest.
//!
//! For now it prepares the guest's basic filesystems, tells the VMM it is ready through the
//! boot-timer port and then reaps orphans. The vsock control server and container
//! management arrive with the agent issue.
//!
//! Every syscall and page fault here costs microseconds of emulated guest-kernel time on
//! PVM hosts (shared/substrate.md), so the start-up path stays short and allocation-light.

mod init;

use std::process::ExitCode;

fn main() -> ExitCode {
    init::install_panic_hook();
    match init::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            init::log(&format!("fatal: {e}"));
            // PID 1 exiting panics the kernel; `panic=-1 reboot=k` on the command line
            // turns that into an i8042 reset, which the VMM reports as a failed guest.
            ExitCode::FAILURE
        }
    }
}
