//! `husk resume ID`: thaw a paused container.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    lifecycle::resume(&g.store()?, &args.id)?;
    Ok(ExitCode::SUCCESS)
}
