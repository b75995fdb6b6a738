//! `husk vmm ...`: low-level VMM commands.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot a guest kernel and stream its console to stdout (debugging, benchmarks).
    Boot(super::vmm_boot::Args),
    /// The per-VM daemon started by `husk create` (internal).
    #[command(hide = true)]
    Daemon(super::vmm_daemon::DaemonArgs),
    /// The host process of one `husk exec` in a VM (internal).
    #[command(hide = true)]
    ExecRelay(super::vmm_daemon::ExecRelayArgs),
    /// The host process of a pod's container in its sandbox's VM (internal).
    #[command(hide = true)]
    Member(super::vmm_daemon::DaemonArgs),
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Boot(args) => super::vmm_boot::run(args),
        Command::Daemon(args) => super::vmm_daemon::daemon(args),
        Command::ExecRelay(args) => super::vmm_daemon::exec_relay(args),
        Command::Member(args) => super::vmm_daemon::member(args),
    }
}
