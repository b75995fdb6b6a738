//! `husk-agent`: PID 1 in the husk guest, or a plain process on the host for tier-2 tests.
//!
//! As PID 1 it prepares the guest (mounts, hostname, loopback), signals the VMM through
//! the boot-timer port and serves the host on vsock port 1024. On the host
//! (`husk-agent --unix-dir DIR`) it skips the PID-1 duties and serves on Unix sockets in
//! DIR. Either way containers are created with youki's libcontainer.
//!
//! Every syscall and page fault here costs microseconds of emulated guest-kernel time on
//! PVM hosts (shared/substrate.md), so the start-up path stays short and allocation-light.

mod console;
mod containers;
mod init;
mod network;
mod ports;
mod reaper;
mod restored;
mod server;
mod share;
mod stdio;
mod transport;
mod vector_state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use husk_protocol::CONTROL_PORT;

use crate::containers::Agent;
use crate::reaper::Reaper;
use crate::transport::{Transport, UnixTransport, VsockTransport};

/// Where the guest keeps container state: tmpfs, gone with the VM.
const GUEST_STATE_DIR: &str = "/run/husk-agent";

/// Runs the husk agent outside a VM (tier-2 tests). As PID 1 it takes no arguments.
///
/// Parsed by hand rather than with clap: every byte of the agent is copied by the
/// emulated guest kernel when it unpacks the initramfs (~3.5 s per MB), and clap's
/// ~150 KB would buy two flags.
#[derive(Debug, PartialEq)]
struct HostArgs {
    /// Serve on Unix sockets named after the port in this directory (DIR/1024 is control).
    unix_dir: PathBuf,
    /// Where to keep container state and bundles.
    state_dir: PathBuf,
}

const HOST_USAGE: &str = "usage: husk-agent --unix-dir DIR --state-dir DIR
  --unix-dir DIR    serve on Unix sockets named after the port in DIR (DIR/1024 is control)
  --state-dir DIR   where to keep container state and bundles
As PID 1 in a husk guest it takes no arguments.";

/// What the host command line asks for.
#[derive(Debug, PartialEq)]
enum HostCommand {
    Serve(HostArgs),
    Help,
    Version,
}

impl HostCommand {
    /// Parses `--unix-dir DIR --state-dir DIR` (also `--flag=DIR`), `--help`, `--version`.
    fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Self, String> {
        let (mut unix_dir, mut state_dir) = (None, None);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let text = arg.to_string_lossy().into_owned();
            let (flag, inline) = match text.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_string(), Some(PathBuf::from(value)))
                }
                _ => (text.clone(), None),
            };
            let slot = match flag.as_str() {
                "-h" | "--help" => return Ok(Self::Help),
                "-V" | "--version" => return Ok(Self::Version),
                "--unix-dir" => &mut unix_dir,
                "--state-dir" => &mut state_dir,
                _ => return Err(format!("unexpected argument {text:?}")),
            };
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{flag} needs a directory"))?,
            };
            *slot = Some(value);
        }
        match (unix_dir, state_dir) {
            (Some(unix_dir), Some(state_dir)) => Ok(Self::Serve(HostArgs {
                unix_dir,
                state_dir,
            })),
            (None, _) => Err("--unix-dir is required".into()),
            (_, None) => Err("--state-dir is required".into()),
        }
    }
}

/// Fatal errors: each ends the agent (and, as PID 1, the VM).
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum FatalError {
    /// {0}
    Init(#[from] init::InitError),
    /// {0}
    Listen(#[from] transport::TransportError),
    /// setting up the agent failed: {0}
    Setup(husk_protocol::AgentError),
    /// the control server failed: {0}
    Serve(std::io::Error),
    /// starting the reaper thread failed: {0}
    Reaper(std::io::Error),
}

fn main() -> ExitCode {
    init::install_panic_hook();
    let pid1 = std::process::id() == 1;
    let result = if pid1 {
        // The kernel passes unknown command-line words to init as arguments: ignore them.
        run_pid1()
    } else {
        let args = match HostCommand::parse(std::env::args_os().skip(1)) {
            Ok(HostCommand::Serve(args)) => args,
            Ok(HostCommand::Help) => {
                println!("{HOST_USAGE}");
                return ExitCode::SUCCESS;
            }
            Ok(HostCommand::Version) => {
                println!("husk-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("husk-agent: {e}\n{HOST_USAGE}");
                return ExitCode::from(2);
            }
        };
        run(
            Arc::new(UnixTransport::new(&args.unix_dir)),
            &args.state_dir,
        )
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            init::log(&format!("fatal: {e}"));
            // PID 1 exiting panics the kernel; `panic=-1 reboot=k` on the command line
            // turns that into an i8042 reset, which the VMM reports as a failed guest.
            ExitCode::FAILURE
        }
    }
}

fn run_pid1() -> Result<(), FatalError> {
    init::prepare_guest()?;
    run(
        Arc::new(VsockTransport),
        std::path::Path::new(GUEST_STATE_DIR),
    )?;
    init::power_off()?;
    Ok(())
}

fn run(transport: Arc<dyn Transport>, state_dir: &std::path::Path) -> Result<(), FatalError> {
    let reaper = Arc::new(Reaper::default());
    {
        let reaper = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || reaper.run())
            .map_err(FatalError::Reaper)?;
    }
    let listener = transport.listen(CONTROL_PORT)?;
    let agent = Arc::new(Agent::new(transport, reaper, state_dir).map_err(FatalError::Setup)?);
    init::ready()?;
    server::serve(agent, listener).map_err(FatalError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<HostCommand, String> {
        HostCommand::parse(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn host_flags_parse_in_both_forms() {
        let want = HostCommand::Serve(HostArgs {
            unix_dir: "/u".into(),
            state_dir: "/s".into(),
        });
        assert_eq!(parse(&["--unix-dir", "/u", "--state-dir", "/s"]), Ok(want));
        let want = HostCommand::Serve(HostArgs {
            unix_dir: "/u".into(),
            state_dir: "/s=x".into(),
        });
        assert_eq!(parse(&["--state-dir=/s=x", "--unix-dir=/u"]), Ok(want));
        assert_eq!(parse(&["--help"]), Ok(HostCommand::Help));
        assert_eq!(parse(&["-V"]), Ok(HostCommand::Version));
    }

    #[test]
    fn bad_host_flags_name_the_problem() {
        let err = parse(&["--unix-dir", "/u"]).unwrap_err();
        assert!(err.contains("--state-dir"), "{err}");
        let err = parse(&["--state-dir", "/s"]).unwrap_err();
        assert!(err.contains("--unix-dir"), "{err}");
        let err = parse(&["--unix-dir"]).unwrap_err();
        assert!(err.contains("--unix-dir needs a directory"), "{err}");
        let err = parse(&["--bogus"]).unwrap_err();
        assert!(err.contains("--bogus"), "{err}");
    }
}
