//! `husk exec [--process F | ARGS...] ID`: run another process in a running container.
//! Without --detach husk waits and exits with the process's exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use husk::sandbox::{lifecycle, ExecOptions};

use super::Global;

#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct Args {
    /// A process.json (the OCI `process` object) instead of ARGS
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Return once the process runs
    #[arg(short, long)]
    pub detach: bool,
    /// Write the process's pid to this file
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Give the process a pty (sent to --console-socket)
    #[arg(short, long)]
    pub tty: bool,
    /// Unix socket to which the pty master is sent
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Add KEY=VALUE to the environment (repeatable)
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Working directory in the container
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// UID[:GID] to run as
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional group ids (repeatable)
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Pass this many extra fds (from 3 on) to the process
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// Set no_new_privs for the process
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability (repeatable)
    #[arg(short, long = "cap")]
    pub cap: Vec<String>,
    /// The container id
    pub id: String,
    /// The command and its arguments
    pub args: Vec<String>,
}

/// Parses `UID[:GID]`.
fn parse_user(user: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let bad = || format!("--user {user:?}: use numeric UID[:GID] (names are not resolved)");
    let uid = uid.parse().with_context(bad)?;
    let gid = gid.map(|g| g.parse()).transpose().with_context(bad)?;
    Ok((uid, gid))
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    match (&args.process, args.args.is_empty()) {
        (Some(_), false) => bail!("exec: give either --process FILE or a command, not both"),
        (None, true) => bail!("exec: give a command to run, or --process FILE"),
        _ => {}
    }
    if args.tty && args.process.is_none() {
        bail!("exec --tty with a command is not done yet: pass --process FILE with \"terminal\": true");
    }
    let (uid, gid) = match &args.user {
        Some(u) => {
            let (uid, gid) = parse_user(u)?;
            (Some(uid), gid)
        }
        None => (None, None),
    };
    let opts = ExecOptions {
        process: args
            .process
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        args: args.args,
        env: args.env,
        cwd: args.cwd,
        uid,
        gid,
        additional_gids: args.additional_gids,
        tty: args.tty,
        console_socket: args
            .console_socket
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        detach: args.detach,
        preserve_fds: args.preserve_fds,
        no_new_privs: args.no_new_privs,
        capabilities: args.cap,
        stdio: Default::default(),
    };
    if !opts.detach {
        lifecycle::become_subreaper()?;
    }
    let store = g.store()?;
    let pid = lifecycle::exec(&store, &args.id, &opts, args.pid_file.as_deref())?;
    if opts.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let code = lifecycle::wait_exit_code(pid)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_numeric_uid_and_optional_gid() {
        assert_eq!(parse_user("1000").unwrap(), (1000, None));
        assert_eq!(parse_user("1:2").unwrap(), (1, Some(2)));
        let err = format!("{:#}", parse_user("nobody").unwrap_err());
        assert!(err.contains("numeric UID"), "{err}");
        assert!(parse_user("1:x").is_err());
    }
}
