//! `husk pause ID`: freeze all processes of a container (the cgroup freezer).

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    lifecycle::pause(&g.store()?, &args.id)?;
    Ok(ExitCode::SUCCESS)
}
