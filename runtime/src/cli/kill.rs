//! `husk kill [--all] ID [SIGNAL]`: signal a container (default SIGTERM).

use std::process::ExitCode;

use husk::sandbox::{lifecycle, signal};

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Signal all processes of the container, not only its init
    #[arg(short, long)]
    pub all: bool,
    /// The container id
    pub id: String,
    /// Name (TERM, SIGKILL) or number
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let sig = signal::parse(&args.signal)?;
    lifecycle::kill(&g.store()?, &args.id, sig, args.all)?;
    Ok(ExitCode::SUCCESS)
}
