//! Hidden `husk vmm daemon`, `husk vmm exec-relay` and `husk vmm member`: the processes
//! `husk create` and `husk exec` start for a VM container or a VM pod's member (see
//! `husk::daemon`). Not for direct use.

use std::path::PathBuf;
use std::process::ExitCode;

use husk::daemon::exec::ExecRequest;

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The daemon (or member) config written by `husk create`
    #[arg(long)]
    config: PathBuf,
    /// The pipe on which to report `ok PID` or the error
    #[arg(long)]
    ready_fd: i32,
}

#[derive(Debug, clap::Args)]
pub struct ExecRelayArgs {
    /// How to reach the agent (`<run>/guest.json`)
    #[arg(long)]
    guest_file: PathBuf,
    /// The container id
    #[arg(long)]
    id: String,
    #[arg(long)]
    exec_id: String,
    /// The OCI process as JSON (removed once read)
    #[arg(long)]
    process: PathBuf,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    #[arg(long)]
    ready_fd: i32,
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

pub fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    husk::daemon::name_process(husk::daemon::DAEMON_PROCESS_NAME);
    Ok(exit(husk::daemon::run::main(&args.config, args.ready_fd)))
}

pub fn exec_relay(args: ExecRelayArgs) -> anyhow::Result<ExitCode> {
    husk::daemon::name_process(husk::daemon::EXEC_RELAY_PROCESS_NAME);
    let request = ExecRequest {
        guest_file: args.guest_file,
        container_id: args.id,
        exec_id: args.exec_id,
        process: args.process,
        console_socket: args.console_socket,
    };
    Ok(exit(husk::daemon::exec::main(&request, args.ready_fd)))
}

pub fn member(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    husk::daemon::name_process(husk::daemon::EXEC_RELAY_PROCESS_NAME);
    Ok(exit(husk::daemon::member::main(
        &args.config,
        args.ready_fd,
    )))
}
