//! Command-line parsing and dispatch. One file per subcommand; each is a thin layer over
//! the library. `anyhow` is used here only, at the edge.

mod features;
mod vmm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// husk: run OCI containers in KVM microVMs, or as plain namespaced containers.
#[derive(Debug, Parser)]
#[command(name = "husk", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the features this runtime and host support (OCI features JSON).
    Features(features::Args),
    /// Low-level VMM commands (debugging and benchmarks).
    #[command(subcommand)]
    Vmm(vmm::Command),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Features(args) => features::run(args),
        Command::Vmm(cmd) => vmm::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
