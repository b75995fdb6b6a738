//! `husk vmm boot`: boots the guest kernel and initramfs in a microVM, streams the guest
//! console to stdout, and ends with `boot: ready after N ms` (or `boot: no ready signal`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use husk::artifacts::{locate, Artifact};
use husk::host::HostMode;
use husk::vmm::boot::cpu_template::CpuTemplate;
use husk::vmm::{BootSource, ConsoleOutput, RunOptions, VmBuilder, VmConfig};
use husk_protocol::boot::ENV_POWEROFF_AFTER_READY;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest kernel (ELF vmlinux). Default: $HUSK_KERNEL, then the build output.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest image: a read-only ext4 root disk (husk-rootfs root-disk) or an uncompressed cpio initramfs. Default: $HUSK_INITRD, then the build output.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Appended to the kernel command line.
    #[arg(long, default_value = "")]
    cmdline_extra: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = husk::vmm::config::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// CPUID model the vCPUs present: host-min (minimal, fastest boot) or host (all KVM offers).
    #[arg(long, default_value_t = CpuTemplate::default())]
    cpu_template: CpuTemplate,
    /// Stop as soon as the guest signals ready instead of waiting for it to power off.
    #[arg(long)]
    until_ready: bool,
    /// Fail when the guest has not signalled ready after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Forward stdin to the guest console.
    #[arg(long)]
    stdin: bool,
    /// Boot until the guest is ready, write a snapshot of the VM to FILE, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "restore")]
    snapshot_to: Option<PathBuf>,
    /// Start from the snapshot in FILE (made by --snapshot-to with the same kernel,
    /// initramfs, vCPUs, memory and command line) instead of booting; it counts as ready
    /// once restored.
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let kernel = locate(Artifact::Kernel, args.kernel.as_deref())?;
    let initrd = locate(Artifact::Initrd, args.initrd.as_deref())?;
    let mut cmdline_extra = args.cmdline_extra.clone();
    // A snapshot is taken at ready and restored with the same command line, so neither
    // may ask the agent to power off after ready.
    let snapshots = args.snapshot_to.is_some() || args.restore.is_some();
    if !args.until_ready && !snapshots {
        // The agent powers the VM off right after ready, so this command ends by itself.
        cmdline_extra = format!("{ENV_POWEROFF_AFTER_READY}=1 {cmdline_extra}");
    }
    let host_mode = HostMode::detect();
    eprintln!(
        "husk: booting {} with {} ({} vCPU, {} MiB, host mode {})",
        kernel.display(),
        initrd.display(),
        args.vcpus,
        args.mem_mib,
        host_mode.as_str()
    );
    let config = VmConfig {
        vcpus: args.vcpus,
        cpu_template: args.cpu_template,
        mem_mib: args.mem_mib,
        boot: BootSource::Linux {
            kernel,
            initrd: Some(initrd),
            cmdline_extra,
        },
        console: ConsoleOutput::Stdout,
        console_input: args.stdin,
        host_mode,
        devices: Default::default(),
    };
    let opts = RunOptions {
        until_ready: args.until_ready,
        ready_timeout: Some(Duration::from_secs(args.timeout)),
    };
    if let Some(path) = &args.snapshot_to {
        return snapshot_at_ready(config, opts, path);
    }
    let builder = match &args.restore {
        Some(path) => VmBuilder::restore(config, path)
            .with_context(|| format!("restoring from {}", path.display())),
        None => VmBuilder::new(config).context("creating the VM"),
    };
    let result = builder.and_then(|builder| {
        let mut vm = builder.start().context("starting the VM")?;
        vm.wait(opts).context("running the VM")
    });
    let ready = result.as_ref().ok().and_then(|outcome| outcome.ready_after);
    let mut out = std::io::stdout().lock();
    match ready {
        Some(t) => writeln!(out, "\nboot: ready after {} ms", t.as_millis())?,
        None => writeln!(out, "\nboot: no ready signal")?,
    }
    out.flush()?;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Boots until ready, writes the snapshot, and reports both times.
fn snapshot_at_ready(config: VmConfig, opts: RunOptions, path: &Path) -> anyhow::Result<ExitCode> {
    let mut vm = VmBuilder::new(config)
        .context("creating the VM")?
        .start()
        .context("starting the VM")?;
    let opts = RunOptions {
        until_ready: true,
        ..opts
    };
    let outcome = vm.wait_then_pause(opts).context("running the VM")?;
    let ready = outcome
        .ready_after
        .context("the guest stopped before it was ready")?;
    let t0 = Instant::now();
    vm.snapshot(path)
        .with_context(|| format!("writing the snapshot {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nboot: ready after {} ms", ready.as_millis())?;
    writeln!(
        out,
        "snapshot: {} written in {} ms",
        path.display(),
        t0.elapsed().as_millis()
    )?;
    Ok(ExitCode::SUCCESS)
}
