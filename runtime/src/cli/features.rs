//! `husk features`: what this runtime supports, in the shape of the OCI features document,
//! with husk's host facts under `annotations`.

use std::process::ExitCode;

use husk::host::HostMode;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let mode = HostMode::detect();
    let doc = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "annotations": {
            "io.husk.host.kvm": mode.as_str(),
            "io.husk.host.caveats": mode.caveats().join("; "),
            "io.husk.isolation": "vm,container",
        }
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    for caveat in mode.caveats() {
        eprintln!("husk: warning: {caveat}");
    }
    Ok(ExitCode::SUCCESS)
}
