//! `husk vmm exec-relay` (hidden): the host process that stands for one process run
//! with `husk exec` in a VM sandbox. It asks the agent (straight over the VM's vsock
//! socket, see the module docs of [`super`]) to start the process, relays its stdio,
//! reports `ok PID` (its own pid, which goes to `--pid-file`) and exits with the
//! process's exit code, so Docker and the shim wait on it as on runc's exec process.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocol::client::AgentClient;
use husk_protocol::messages::{ProcessRef, StdioRequest};
use oci_spec::runtime::Process;

use super::guest::GuestAddress;
use super::ready::ReadyWriter;
use super::{agent_err, io_err, relay, DaemonError};

/// Exit code when the process was lost (agent or guest gone).
const LOST: i32 = 255;

/// What the helper is told.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub guest_file: PathBuf,
    pub container_id: String,
    pub exec_id: String,
    /// The OCI process, as JSON; removed once read.
    pub process: PathBuf,
    pub console_socket: Option<PathBuf>,
}

/// Reads how to reach the agent.
pub fn guest_address(path: &Path) -> Result<GuestAddress, DaemonError> {
    let text = std::fs::read(path).map_err(io_err(
        "reading the guest address (is the vmm daemon running?)",
        path,
    ))?;
    serde_json::from_slice(&text).map_err(|source| DaemonError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the helper; returns its exit code.
pub fn main(request: &ExecRequest, ready_fd: RawFd) -> i32 {
    let ready = match ReadyWriter::from_raw(ready_fd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("husk vmm exec-relay: {e}");
            return LOST;
        }
    };
    let process = ProcessRef {
        container_id: request.container_id.clone(),
        exec_id: Some(request.exec_id.clone()),
    };
    serve(ready, start(request), process)
}

/// The rest of a relay's life once it tried to start `process`: reports `ok PID` (its
/// own pid) or the error on `ready`, waits for the process, lets the last output reach
/// the host, and returns the exit code.
pub fn serve(
    ready: ReadyWriter,
    started: Result<(relay::Relays, AgentClient), DaemonError>,
    process: ProcessRef,
) -> i32 {
    match started {
        Ok((relays, mut waiter)) => {
            ready.ok(std::process::id() as i32);
            let code = waiter
                .wait_process(process)
                .map(|s| s.code())
                .unwrap_or(LOST);
            relays.drain(Duration::from_secs(5));
            code
        }
        Err(e) => {
            ready.err(&e.to_string());
            LOST
        }
    }
}

fn start(request: &ExecRequest) -> Result<(relay::Relays, AgentClient), DaemonError> {
    let text =
        std::fs::read(&request.process).map_err(io_err("reading the process", &request.process))?;
    let _ = std::fs::remove_file(&request.process);
    let process: Process = serde_json::from_slice(&text).map_err(|source| DaemonError::Config {
        path: request.process.clone(),
        source,
    })?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && request.console_socket.is_none() {
        return Err(DaemonError::NoConsoleSocket);
    }
    let connector = guest_address(&request.guest_file)?.connector();
    let stdio = StdioRequest {
        stdin: !terminal && relay::has_stdin(),
    };
    let spawned = AgentClient::connect(&*connector)
        .and_then(|mut a| a.exec_process(&request.container_id, &request.exec_id, process, stdio))
        .map_err(agent_err("starting the process in the guest"))?;
    let relays = match &request.console_socket {
        Some(socket) if terminal => {
            relay::attach_pty(&*connector, spawned.stdio, relay::open_console(socket)?)?
        }
        _ => relay::attach_pipes(&*connector, spawned.stdio)?,
    };
    let waiter = AgentClient::connect(&*connector).map_err(agent_err("connecting to the agent"))?;
    Ok((relays, waiter))
}
