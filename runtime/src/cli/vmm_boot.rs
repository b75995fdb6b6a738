//! `husk vmm boot`: boots the guest kernel and initramfs in a microVM, streams the guest
//! console to stdout, and ends with `boot: ready after N ms` (or `boot: no ready signal`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use husk::artifacts::{locate, Artifact};
use husk::host::HostMode;
use husk::vmm::boot::cpu_template::CpuTemplate;
use husk::vmm::{BootSource, ConsoleOutput, RunOptions, VmBuilder, VmConfig};
use husk_protocol::boot::CMDLINE_POWEROFF_AFTER_READY;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest kernel (ELF vmlinux). Default: $HUSK_KERNEL, then the build output.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (uncompressed cpio). Default: $HUSK_INITRD, then the build output.
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
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let kernel = locate(Artifact::Kernel, args.kernel.as_deref())?;
    let initrd = locate(Artifact::Initrd, args.initrd.as_deref())?;
    let mut cmdline_extra = args.cmdline_extra.clone();
    if !args.until_ready {
        // The agent powers the VM off right after ready, so this command ends by itself.
        cmdline_extra = format!("{CMDLINE_POWEROFF_AFTER_READY} {cmdline_extra}");
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
    let result = VmBuilder::new(config)
        .context("creating the VM")
        .and_then(|builder| {
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
