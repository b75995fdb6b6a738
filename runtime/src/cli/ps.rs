//! `husk ps ID [--format table|json]`: the pids of a container's processes: host pids with
//! `--isolation container`, the guest's pids (read by the agent from the container's
//! cgroup) with `--isolation vm`.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::{Format, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let pids = lifecycle::pids(&g.store()?, &args.id)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&pids)?),
        Format::Table => {
            println!("PID");
            for pid in pids {
                println!("{pid}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
