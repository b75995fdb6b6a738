//! `husk start`: release a created container's process from the exec barrier.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    lifecycle::start(&g.store()?, &args.id)?;
    Ok(ExitCode::SUCCESS)
}
