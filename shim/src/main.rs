//! `containerd-shim-husk-v2`: the containerd shim v2 for husk. containerd runs it as
//! `containerd-shim-husk-v2 -namespace NS -id ID -address SOCK ... start|delete`, and the
//! started instance serves the Task API over ttrpc. [`shim`] answers the actions,
//! [`service`] the Task API, and [`tasks`] does the work over the husk library.

mod events;
mod metrics;
mod pod;
mod process;
mod rootfs;
mod service;
mod shim;
mod stdio;
mod tasks;
mod tty;

use anyhow::Context;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).context("bad arguments")?;
    if flags.version {
        println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.namespace.is_empty() {
        anyhow::bail!("-namespace is required: this program is run by containerd (ctr run --runtime io.containerd.husk.v2)");
    }
    match flags.action.as_str() {
        "start" => shim::start(&flags)?,
        "delete" => shim::delete(&flags)?,
        _ => shim::serve(&flags)?,
    }
    Ok(())
}
