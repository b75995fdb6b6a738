//! `husk delete [--force] ID`: remove a container and all it left behind.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill a running container first
    #[arg(short, long)]
    pub force: bool,
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    lifecycle::delete(&g.store()?, &args.id, args.force)?;
    Ok(ExitCode::SUCCESS)
}
