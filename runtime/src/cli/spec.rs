//! `husk spec [--bundle B]`: write runc's default config.json (runs `sh` in `rootfs/`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use oci_spec::runtime::Spec;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write config.json
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// A spec for a rootless container (user namespace mapped to the current user)
    #[arg(long)]
    pub rootless: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = args.bundle.join("config.json");
    if path.exists() {
        bail!("{} exists already: remove it first", path.display());
    }
    let spec = if args.rootless {
        Spec::rootless(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    } else {
        Spec::default()
    };
    let json = serde_json::to_string_pretty(&spec)?;
    std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}
