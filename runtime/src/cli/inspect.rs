//! `husk inspect ID`: what isolates a running container from the host (isolation level,
//! kernel, reachable host syscalls, the VMM's uid, capabilities, namespaces and root,
//! memory overhead, start time, KVM exit counters), as a table or JSON.

use std::process::ExitCode;

use super::{Format, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let report = husk::inspect::inspect(&g.store()?, &args.id)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print!("{}", husk::inspect::render(&report)),
    }
    Ok(ExitCode::SUCCESS)
}
