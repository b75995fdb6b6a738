//! `husk update [-r FILE] [--memory N] [--pids-limit N] [--cpu-*] ID`: change resource
//! limits of a container's cgroup (container isolation: on the host; vm isolation: the
//! container's cgroup in the guest, through the agent; the VM's size is fixed at boot).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use husk::sandbox::lifecycle;
use oci_spec::runtime::{LinuxCpu, LinuxResources};

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// LinuxResources JSON ("-" for stdin); the flags below override it
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes
    #[arg(long)]
    pub memory: Option<i64>,
    /// Maximum number of processes
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// CPU shares (relative weight)
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// CPU CFS quota in microseconds
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// The container id
    pub id: String,
}

fn resources(args: &Args) -> anyhow::Result<LinuxResources> {
    let mut r = match &args.resources {
        None => LinuxResources::default(),
        Some(path) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
            }
            let mut de = serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                anyhow::anyhow!(
                    "{}: invalid value at `{}`: {}",
                    path.display(),
                    e.path(),
                    e.inner()
                )
            })?
        }
    };
    if let Some(limit) = args.memory {
        let mut m = r.memory().unwrap_or_default();
        m.set_limit(Some(limit));
        r.set_memory(Some(m));
    }
    if let Some(limit) = args.pids_limit {
        let mut p = r.pids().unwrap_or_default();
        p.set_limit(limit);
        r.set_pids(Some(p));
    }
    if args.cpu_shares.is_some() || args.cpu_quota.is_some() || args.cpu_period.is_some() {
        let mut c = r.cpu().clone().unwrap_or_else(LinuxCpu::default);
        if args.cpu_shares.is_some() {
            c.set_shares(args.cpu_shares);
        }
        if args.cpu_quota.is_some() {
            c.set_quota(args.cpu_quota);
        }
        if args.cpu_period.is_some() {
            c.set_period(args.cpu_period);
        }
        r.set_cpu(Some(c));
    }
    Ok(r)
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let r = resources(&args)?;
    lifecycle::update(&g.store()?, &args.id, &r)?;
    Ok(ExitCode::SUCCESS)
}
