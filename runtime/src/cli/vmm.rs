//! `husk vmm ...`: low-level VMM commands.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot a guest kernel and stream its console to stdout (debugging, benchmarks).
    Boot(super::vmm_boot::Args),
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Boot(args) => super::vmm_boot::run(args),
    }
}
