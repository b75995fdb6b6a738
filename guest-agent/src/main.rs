//! `husk-agent`: PID 1 in the husk guest, or a plain process on the host for tier-2 tests.
//!
//! As PID 1 it prepares the guest (mounts, hostname, loopback), signals the VMM through
//! the boot-timer port and serves the host on vsock port 1024. On the host
//! (`husk-agent --unix-dir DIR`) it skips the PID-1 duties and serves on Unix sockets in
//! DIR. Either way containers are created with youki's libcontainer.
//!
//! Every syscall and page fault here costs microseconds of emulated guest-kernel time on
//! PVM hosts (shared/substrate.md), so the start-up path stays short and allocation-light.

mod console;
mod containers;
mod init;
mod network;
mod ports;
mod reaper;
mod restored;
mod server;
mod share;
mod stdio;
mod transport;
mod vector_state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use husk_protocol::CONTROL_PORT;

use crate::containers::Agent;
use crate::reaper::Reaper;
use crate::transport::{Transport, UnixTransport, VsockTransport};

/// Where the guest keeps container state: tmpfs, gone with the VM.
const GUEST_STATE_DIR: &str = "/run/husk-agent";

/// Runs the husk agent outside a VM (tier-2 tests). As PID 1 it takes no arguments.
#[derive(Debug, Parser)]
#[command(name = "husk-agent", version)]
struct HostArgs {
    /// Serve on Unix sockets named after the port in this directory (DIR/1024 is control).
    #[arg(long)]
    unix_dir: PathBuf,
    /// Where to keep container state and bundles.
    #[arg(long)]
    state_dir: PathBuf,
}

/// Fatal errors: each ends the agent (and, as PID 1, the VM).
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum FatalError {
    /// {0}
    Init(#[from] init::InitError),
    /// {0}
    Listen(#[from] transport::TransportError),
    /// setting up the agent failed: {0}
    Setup(husk_protocol::AgentError),
    /// the control server failed: {0}
    Serve(std::io::Error),
    /// starting the reaper thread failed: {0}
    Reaper(std::io::Error),
}

fn main() -> ExitCode {
    init::install_panic_hook();
    let pid1 = std::process::id() == 1;
    let result = if pid1 {
        // The kernel passes unknown command-line words to init as arguments: ignore them.
        run_pid1()
    } else {
        let args = HostArgs::parse();
        run(
            Arc::new(UnixTransport::new(&args.unix_dir)),
            &args.state_dir,
        )
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            init::log(&format!("fatal: {e}"));
            // PID 1 exiting panics the kernel; `panic=-1 reboot=k` on the command line
            // turns that into an i8042 reset, which the VMM reports as a failed guest.
            ExitCode::FAILURE
        }
    }
}

fn run_pid1() -> Result<(), FatalError> {
    init::prepare_guest()?;
    run(
        Arc::new(VsockTransport),
        std::path::Path::new(GUEST_STATE_DIR),
    )?;
    init::power_off()?;
    Ok(())
}

fn run(transport: Arc<dyn Transport>, state_dir: &std::path::Path) -> Result<(), FatalError> {
    let reaper = Arc::new(Reaper::default());
    {
        let reaper = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || reaper.run())
            .map_err(FatalError::Reaper)?;
    }
    let listener = transport.listen(CONTROL_PORT)?;
    let agent = Arc::new(Agent::new(transport, reaper, state_dir).map_err(FatalError::Setup)?);
    init::ready()?;
    server::serve(agent, listener).map_err(FatalError::Serve)
}
