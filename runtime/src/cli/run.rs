//! `husk run`: create + start; without --detach, wait for the container with its stdio
//! attached, delete it, and exit with its exit code.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::{create, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub create: create::Args,
    /// Return once the container runs, leaving it running
    #[arg(short, long)]
    pub detach: bool,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let store = g.store()?;
    let c = &args.create;
    if !args.detach {
        lifecycle::become_subreaper()?;
    }
    let opts = c.options(!args.detach, g)?;
    let pid = lifecycle::create(
        &store,
        &c.id,
        &c.bundle,
        g.isolation,
        &opts,
        c.pid_file.as_deref(),
    )?;
    if let Err(e) = lifecycle::start(&store, &c.id) {
        let _ = lifecycle::delete(&store, &c.id, true);
        return Err(e.into());
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let code = lifecycle::wait_exit_code(pid)?;
    lifecycle::delete(&store, &c.id, true)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}
