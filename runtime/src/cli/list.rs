//! `husk list [--format table|json] [-q]`: the containers under --root.

use std::process::ExitCode;

use husk::sandbox::lifecycle;

use super::{Format, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Print only the ids
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let states = lifecycle::list(&g.store()?)?;
    if args.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&states)?),
        Format::Table => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {:<32} {}",
                    s.id,
                    s.pid,
                    s.status.to_string(),
                    s.bundle.display(),
                    s.created,
                    if s.owner.is_empty() { "root" } else { &s.owner }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
