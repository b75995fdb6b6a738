//! `husk-rootfs`: command line for the initramfs, bundle and image builders.

use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk_rootfs::initramfs::AddSpec;
use husk_rootfs::{bundle, busybox, image, initramfs, root_disk};

#[derive(Parser)]
#[command(
    version,
    about = "Builds the husk guest initramfs, OCI bundles and OCI image tarballs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What both forms of the guest root are made of, and where to write it.
#[derive(clap::Args)]
struct GuestRootArgs {
    /// The statically linked husk-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the file.
    #[arg(long)]
    out: PathBuf,
    /// Add a host file or directory tree at DEST (repeatable; symlinks and modes kept).
    #[arg(long = "add", value_name = "SRC:DEST")]
    adds: Vec<AddSpec>,
}

#[derive(Subcommand)]
enum Command {
    /// Uncompressed newc cpio with the static agent as /init.
    Initramfs(GuestRootArgs),
    /// Read-only ext4 root disk image with the static agent as /init (the guest reads only what it touches).
    RootDisk(GuestRootArgs),
    /// OCI bundle (config.json + busybox rootfs/).
    Bundle {
        /// Bundle directory; must be empty or missing unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Replace config.json and rootfs/ in a non-empty --out.
        #[arg(long)]
        force: bool,
        /// Static busybox binary (Debian package busybox-static).
        #[arg(long, default_value = busybox::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
        /// The container's command (default: sh).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// OCI image layout tarball (also loadable by `docker load`).
    Image {
        /// Where to write the tarball.
        #[arg(long)]
        out: PathBuf,
        /// Image name, REPOSITORY[:TAG].
        #[arg(long, default_value = image::DEFAULT_NAME)]
        name: image::ImageName,
        /// Static busybox binary (Debian package busybox-static).
        #[arg(long, default_value = busybox::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("husk-rootfs: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Initramfs(GuestRootArgs { agent, out, adds }) => {
            let tree = initramfs::tree(&agent, &adds)?;
            write_atomically(&out, |file| Ok(initramfs::write_cpio(&tree, file)?))?;
        }
        Command::RootDisk(GuestRootArgs { agent, out, adds }) => {
            // The same tree as the initramfs: same files, same checks of the agent.
            let tree = initramfs::tree(&agent, &adds)?;
            root_disk::write_root_disk(&tree, &out)?;
        }
        Command::Bundle {
            out,
            force,
            busybox,
            args,
        } => bundle::build(&out, &args, &busybox, force)?,
        Command::Image { out, name, busybox } => {
            let tree = busybox::rootfs(&busybox)?;
            write_atomically(&out, |file| Ok(image::write_image(&tree, &name, file)?))?;
        }
    }
    Ok(())
}

/// Writes `out` through a temporary file in the same directory, renamed into place only
/// when complete, so a failed run never leaves a truncated archive behind.
fn write_atomically(
    out: &Path,
    write: impl FnOnce(BufWriter<File>) -> anyhow::Result<BufWriter<File>>,
) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp = tempfile::NamedTempFile::new_in(dir).with_context(|| {
        format!(
            "creating a temporary file in {} for {}",
            dir.display(),
            out.display()
        )
    })?;
    let (file, temp_path) = temp.into_parts();
    let file = write(BufWriter::new(file))?;
    let file = file
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", out.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", out.display()))?;
    // Temporary files are created 0600; archives are meant to be read by others.
    std::fs::set_permissions(&temp_path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", out.display()))?;
    temp_path
        .persist(out)
        .with_context(|| format!("renaming the finished file to {}", out.display()))?;
    Ok(())
}
