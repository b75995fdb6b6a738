//! Command-line parsing and dispatch. One file per subcommand; each is a thin layer over
//! the library. `anyhow` is used here only, at the edge.
//!
//! The global flags and subcommands follow runc's, so Docker, containerd's runc shim and
//! runc-style test suites can drive husk as they drive runc.

mod create;
mod delete;
mod events;
mod exec;
mod features;
mod inspect;
mod kill;
mod list;
mod log;
mod pause;
mod ps;
mod resume;
mod run;
mod spec;
mod start;
mod state;
mod update;
mod vmm;
mod vmm_boot;
mod vmm_daemon;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk::oci::{Isolation, Store};

/// husk: run OCI containers in KVM microVMs, or as plain namespaced containers.
#[derive(Debug, Parser)]
#[command(name = "husk", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand shares (runc's, plus husk's).
/// `--format` of the commands that print either a table for people or JSON for tools
/// (`list`, `ps`, `inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Global {
    /// Directory for the containers' state
    #[arg(long, global = true, default_value = "/run/husk")]
    pub root: PathBuf,
    /// Also write errors to this file
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Format of --log
    #[arg(long, global = true, value_enum, default_value_t = log::Format::Text)]
    pub log_format: log::Format,
    /// Write debug messages to the log too
    #[arg(long, global = true)]
    pub debug: bool,
    /// Use systemd for cgroups (not supported: husk uses cgroupfs)
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Guest kernel for --isolation vm
    #[arg(long, global = true, env = "HUSK_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Guest image for --isolation vm: a root disk image (husk-rootfs root-disk) or an initramfs
    #[arg(long, global = true, env = "HUSK_INITRD")]
    pub initrd: Option<PathBuf>,
    /// Isolation level when the bundle has no io.husk.isolation annotation [default: vm]
    #[arg(long, global = true, env = "HUSK_ISOLATION")]
    pub isolation: Option<Isolation>,
    /// Development only: the vmm daemon's seccomp filters `kill` (default), `log` calls
    /// outside the allowlists to the kernel audit log, or `off`. Release builds accept only `kill`.
    #[arg(long, global = true, default_value = "kill", hide = true)]
    pub seccomp: husk::seccomp::SeccompMode,
}

impl Global {
    /// The state store under --root.
    pub fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.root).with_context(|| "opening the --root state directory".to_string())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container: it waits at the exec barrier until `start`.
    Create(create::Args),
    /// Start a created container's process.
    Start(start::Args),
    /// Create and start a container, and wait for it unless --detach.
    Run(run::Args),
    /// Print the OCI state of a container.
    State(state::Args),
    /// Send a signal to a container's process.
    Kill(kill::Args),
    /// Delete a container and everything it left behind.
    Delete(delete::Args),
    /// Run a new process in a running container.
    Exec(exec::Args),
    /// List the processes of a container.
    Ps(ps::Args),
    /// List containers under --root.
    List(list::Args),
    /// Write a default config.json into a bundle.
    Spec(spec::Args),
    /// Print the features this runtime and host support (OCI features JSON).
    Features(features::Args),
    /// Freeze all processes of a container.
    Pause(pause::Args),
    /// Thaw a paused container.
    Resume(resume::Args),
    /// Print resource usage of a container.
    Events(events::Args),
    /// Change a container's resource limits.
    Update(update::Args),
    /// Show what isolates a running container from the host (table, or --format json).
    Inspect(inspect::Args),
    /// Low-level VMM commands (debugging and benchmarks).
    #[command(subcommand)]
    Vmm(vmm::Command),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let global = cli.global;
    let result = if global.systemd_cgroup {
        Err(anyhow::anyhow!(
            "--systemd-cgroup is not supported: husk manages cgroups with cgroupfs only; drop the flag (for Docker: remove native.cgroupdriver=systemd)"
        ))
    } else {
        dispatch(cli.command, &global)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = message(&e);
            eprintln!("husk: {msg}");
            if let Some(path) = &global.log {
                log::error(path, global.log_format, &msg);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once (library errors often embed
/// their source's text already).
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Commands that only print: like other Unix tools they end quietly when their reader
/// goes away (`husk list | head -1`) instead of failing on the broken pipe.
fn only_prints(command: &Command) -> bool {
    matches!(
        command,
        Command::State(_)
            | Command::List(_)
            | Command::Ps(_)
            | Command::Spec(_)
            | Command::Features(_)
            | Command::Events(_)
            | Command::Inspect(_)
    )
}

fn dispatch(command: Command, g: &Global) -> anyhow::Result<ExitCode> {
    if only_prints(&command) {
        // SAFETY: restores the default disposition of one signal before any thread is
        // started; no handler runs Rust code.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match command {
        Command::Create(args) => create::run(args, g),
        Command::Start(args) => start::run(args, g),
        Command::Run(args) => run::run(args, g),
        Command::State(args) => state::run(args, g),
        Command::Kill(args) => kill::run(args, g),
        Command::Delete(args) => delete::run(args, g),
        Command::Exec(args) => exec::run(args, g),
        Command::Ps(args) => ps::run(args, g),
        Command::List(args) => list::run(args, g),
        Command::Spec(args) => spec::run(args),
        Command::Features(args) => features::run(args),
        Command::Pause(args) => pause::run(args, g),
        Command::Resume(args) => resume::run(args, g),
        Command::Events(args) => events::run(args, g),
        Command::Update(args) => update::run(args, g),
        Command::Inspect(args) => inspect::run(args, g),
        Command::Vmm(cmd) => vmm::run(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_names_each_cause_once() {
        let inner = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(inner)
            .context("writing state")
            .context("writing state: disk on fire");
        assert_eq!(message(&e), "writing state: disk on fire");
        let e = anyhow::anyhow!("low").context("high");
        assert_eq!(message(&e), "high: low");
    }

    #[test]
    fn command_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_dockers_create_line() {
        let cli = Cli::try_parse_from([
            "husk",
            "--root",
            "/r",
            "--log",
            "/l",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "c1",
        ])
        .unwrap();
        assert_eq!(cli.global.root, PathBuf::from("/r"));
        assert_eq!(cli.global.log_format, log::Format::Json);
        assert!(matches!(cli.command, Command::Create(ref a) if a.id == "c1"));
    }

    #[test]
    fn global_flags_work_after_the_subcommand_and_bad_values_fail() {
        let cli = Cli::try_parse_from([
            "husk",
            "state",
            "c1",
            "--root",
            "/x",
            "--isolation",
            "container",
        ])
        .unwrap();
        assert_eq!(cli.global.root, PathBuf::from("/x"));
        assert_eq!(cli.global.isolation, Some(Isolation::Container));
        assert!(Cli::try_parse_from(["husk", "--isolation", "kvm", "state", "c"]).is_err());
        assert!(Cli::try_parse_from(["husk", "--log-format", "xml", "state", "c"]).is_err());
    }
}
