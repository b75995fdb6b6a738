//! `husk create`: create a container that waits at the exec barrier until `husk start`.

use std::path::PathBuf;
use std::process::ExitCode;

use husk::sandbox::{lifecycle, CreateOptions, GuestArtifacts};

use super::Global;

#[derive(Debug, clap::Args)]
#[group(skip)]
pub struct Args {
    /// The bundle directory (config.json + rootfs)
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container's pid to this file
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to which the pty master is sent (process.terminal: true)
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Move the root instead of pivot_root (rootfs on ramfs)
    #[arg(long)]
    pub no_pivot: bool,
    /// Do not create a new session keyring
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass this many extra fds (from 3 on) to the container
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// Boot the microVM cold instead of restoring it from a template (--isolation vm)
    #[arg(long)]
    pub no_template: bool,
    /// The container id
    pub id: String,
}

impl Args {
    pub fn options(&self, foreground: bool, g: &Global) -> anyhow::Result<CreateOptions> {
        Ok(CreateOptions {
            console_socket: self
                .console_socket
                .as_deref()
                .map(std::path::absolute)
                .transpose()?,
            no_pivot: self.no_pivot,
            no_new_keyring: self.no_new_keyring,
            preserve_fds: self.preserve_fds,
            foreground,
            stdio: Default::default(),
            guest_artifacts: GuestArtifacts {
                kernel: g.kernel.clone(),
                initrd: g.initrd.clone(),
            },
            seccomp: g.seccomp,
            no_template: self.no_template,
        })
    }
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let store = g.store()?;
    let opts = args.options(false, g)?;
    lifecycle::create(
        &store,
        &args.id,
        &args.bundle,
        g.isolation,
        &opts,
        args.pid_file.as_deref(),
    )?;
    Ok(ExitCode::SUCCESS)
}
