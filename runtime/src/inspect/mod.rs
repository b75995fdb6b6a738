//! `husk inspect`: what isolates a container, read from the running system rather than
//! from configuration. For a VM: the VMM daemon's confinement from `/proc/PID` (ids,
//! capabilities, seccomp per thread, namespaces, root), the host syscalls its threads
//! may make (the allowlists' sizes), its memory and virtiofsd's, the guest kernel, and
//! the KVM exit counters the daemon reads from its vCPUs' binary stats fds. For a plain
//! container: the same figures for the container's init, where they apply.

pub mod kvm_stats;
pub mod procfs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::daemon::control::{self, ControlRequest, ControlResponse};
use crate::daemon::{DaemonConfig, GuestKind, Layout};
use crate::oci::{Bundle, Isolation, Status, Store};
use crate::sandbox::lifecycle;
use crate::seccomp::{self, ThreadKind};
use kvm_stats::VcpuStats;

/// Errors building a report.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum InspectError {
    /// {0}
    Lifecycle(#[from] lifecycle::LifecycleError),
    /// {0}
    Store(#[from] crate::oci::StoreError),
    /// container {0:?} is not running (status {1:?}): there is no process to inspect; start it first
    NotRunning(String, Status),
    /// reading /proc/{pid}: {source}
    Proc { pid: i32, source: std::io::Error },
    /// {0}
    Daemon(#[from] crate::daemon::DaemonError),
}

/// One thread of the inspected process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadReport {
    pub tid: i32,
    pub name: String,
    /// `Seccomp:` of its status: 0 none, 2 filter.
    pub seccomp: u8,
}

/// One namespace of the process next to the host's (those of `husk inspect` itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceReport {
    pub id: String,
    pub host: String,
    pub shared_with_host: bool,
}

/// The process that stands between the workload and the host kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: i32,
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
    pub cap_inh: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub threads: Vec<ThreadReport>,
    pub namespaces: BTreeMap<String, NamespaceReport>,
    /// `/proc/PID/root` as seen from the host.
    pub root: String,
    pub rss_kib: u64,
}

/// The container's own seccomp profile (config.json `linux.seccomp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileReport {
    /// `None`: the bundle has no profile.
    pub default_action: Option<String>,
    /// Syscalls the profile allows by name when its default denies; `None` when the
    /// default action allows (everything not listed is reachable) or there is no profile.
    pub allowed: Option<usize>,
}

/// How many host syscalls each side may make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallReport {
    /// VMs: the VMM's allowlist per thread kind (`vcpu`, `event_loop`, `control`).
    pub vmm_per_thread: BTreeMap<String, usize>,
    /// VMs: the union of those lists (what a guest that took over the VMM could call).
    pub vmm_union: Option<usize>,
    /// The seccomp mode the VMM was started with (`kill`, `log`, `off`).
    pub vmm_mode: Option<String>,
    pub container_profile: ProfileReport,
}

/// Resident memory the sandbox costs beyond the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub vmm_rss_kib: u64,
    /// virtiofsd and its sandboxed worker.
    pub virtiofsd_rss_kib: u64,
    pub virtiofsd_pids: Vec<i32>,
    pub total_kib: u64,
}

/// The kernel the workload's syscalls land in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelReport {
    /// `guest` (its own kernel in the VM) or `host`.
    pub workload_runs_on: String,
    pub guest: Option<String>,
    pub host: String,
}

/// Everything `husk inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub isolation: Isolation,
    pub status: Status,
    /// Seconds since the epoch when the process (VMM daemon or container init) started.
    pub started: Option<u64>,
    pub kernel: KernelReport,
    pub syscalls: SyscallReport,
    pub process: ProcessReport,
    /// VMs only.
    pub memory: Option<MemoryReport>,
    /// VMs only: per vCPU, the exit counters (`exits` and `*_exits`) from KVM_GET_STATS_FD.
    pub kvm_exits: Option<Vec<VcpuStats>>,
    /// What the report cannot show, and why.
    pub notes: Vec<String>,
}

/// Reads `/proc/PID` into a [`ProcessReport`].
pub fn process_report(pid: i32) -> Result<ProcessReport, InspectError> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let status = procfs::status(&dir).map_err(|source| InspectError::Proc { pid, source })?;
    let threads = procfs::threads(pid)
        .into_iter()
        .filter_map(|tid| {
            let task = dir.join("task").join(tid.to_string());
            let s = procfs::status(&task).ok()?;
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            Some(ThreadReport {
                tid,
                name: name.trim().to_string(),
                seccomp: s.seccomp,
            })
        })
        .collect();
    // The caller's own namespaces stand for the host's: `husk inspect` runs on the host
    // (PID 1's links are not readable in every host setup, e.g. a CI sandbox).
    let host = procfs::namespaces(std::process::id() as i32);
    let namespaces = procfs::namespaces(pid)
        .into_iter()
        .map(|(kind, id)| {
            let host = host.get(&kind).cloned().unwrap_or_default();
            let report = NamespaceReport {
                shared_with_host: id == host,
                id,
                host,
            };
            (kind, report)
        })
        .collect();
    Ok(ProcessReport {
        pid,
        name: procfs::comm(pid),
        uid: status.uid[1],
        gid: status.gid[1],
        cap_eff: status.cap_eff,
        cap_prm: status.cap_prm,
        cap_bnd: status.cap_bnd,
        cap_inh: status.cap_inh,
        cap_amb: status.cap_amb,
        no_new_privs: status.no_new_privs,
        threads,
        namespaces,
        root: procfs::root(pid)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        rss_kib: status.rss_kib,
    })
}

/// Counts the syscalls a bundle's seccomp profile lets through by name.
pub fn profile_report(bundle: &Bundle) -> ProfileReport {
    let Some(profile) = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().clone())
    else {
        return ProfileReport {
            default_action: None,
            allowed: None,
        };
    };
    let default = format!("{:?}", profile.default_action());
    let allows = |action: String| action.contains("Allow");
    let allowed = if allows(default.clone()) {
        None
    } else {
        let names: BTreeSet<String> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| allows(format!("{:?}", s.action())))
            .flat_map(|s| s.names().iter().cloned())
            .collect();
        Some(names.len())
    };
    ProfileReport {
        default_action: Some(default),
        allowed,
    }
}

/// The pid of a jailed vmm's virtiofsd, from the pid file virtiofsd keeps next to its
/// socket while it runs.
fn jailed_virtiofsd(layout: &Layout) -> Option<i32> {
    if !layout.jailed() {
        return None;
    }
    let text = std::fs::read_to_string(layout.virtiofsd_pid_file()).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// The VMM's allowlist sizes per thread kind and their union.
pub fn vmm_syscalls() -> (BTreeMap<String, usize>, usize) {
    let mut union = BTreeSet::new();
    let per_thread = ThreadKind::ALL
        .iter()
        .map(|&kind| {
            let list = seccomp::syscalls(kind);
            let n = list.len();
            union.extend(list);
            (kind.name().to_string(), n)
        })
        .collect();
    (per_thread, union.len())
}

/// Builds the report of container `id`.
pub fn inspect(store: &Store, id: &str) -> Result<Report, InspectError> {
    let state = lifecycle::state(store, id)?;
    if !matches!(
        state.status,
        Status::Created | Status::Running | Status::Paused
    ) || state.pid <= 0
    {
        return Err(InspectError::NotRunning(id.to_string(), state.status));
    }
    let record = store.lock(id)?.read()?;
    let bundle = Bundle::load(&record.bundle).ok();
    let container_profile = bundle
        .as_ref()
        .map(profile_report)
        .unwrap_or(ProfileReport {
            default_action: None,
            allowed: None,
        });
    let process = process_report(state.pid)?;
    let host = procfs::host_kernel();
    let mut notes = Vec::new();
    match record.isolation {
        Isolation::Container => Ok(Report {
            id: id.to_string(),
            isolation: Isolation::Container,
            status: state.status,
            started: procfs::start_time(state.pid),
            kernel: KernelReport {
                workload_runs_on: "host".into(),
                guest: None,
                host,
            },
            syscalls: SyscallReport {
                vmm_per_thread: BTreeMap::new(),
                vmm_union: None,
                vmm_mode: None,
                container_profile,
            },
            process,
            memory: None,
            kvm_exits: None,
            notes,
        }),
        Isolation::Vm => {
            let config =
                DaemonConfig::read(&Layout::new(&store.root().join(id), id, false).config())?;
            let layout = config.layout();
            let guest = match &config.guest {
                GuestKind::Vm { kernel, .. } => std::fs::read(kernel)
                    .ok()
                    .and_then(|image| procfs::kernel_image_release(&image)),
                GuestKind::HostAgent { .. } => {
                    notes.push("test guest: the agent runs on the host, there is no VM".into());
                    None
                }
            };
            // A jailed vmm's virtiofsd was started by its launcher, so it is not the
            // vmm's child: its pid file names it.
            let helpers = match jailed_virtiofsd(&layout) {
                Some(pid) => std::iter::once(pid)
                    .chain(procfs::descendants(pid))
                    .collect(),
                None => procfs::descendants(state.pid),
            };
            let helper_rss: u64 = helpers
                .iter()
                .filter_map(|&p| procfs::status(&PathBuf::from(format!("/proc/{p}"))).ok())
                .map(|s| s.rss_kib)
                .sum();
            let kvm_exits = match control::call(&layout.control_socket(), ControlRequest::KvmStats)
            {
                Ok(ControlResponse::KvmStats { vcpus }) => Some(vcpus),
                Ok(other) => {
                    notes.push(format!("no KVM statistics: the daemon answered {other:?}"));
                    None
                }
                Err(e) => {
                    notes.push(format!("no KVM statistics: {e}"));
                    None
                }
            };
            if layout.jailed() {
                let jail = layout.jail_root().join(id).join("jail");
                notes.push(format!(
                    "the VMM is jailed: uid {} (no capabilities), root {}, its own mount/pid/ipc/uts/net namespaces, cgroups {}/husk/{id}",
                    process.uid,
                    jail.display(),
                    crate::jailer::cgroup::CONTROLLERS.join(",")
                ));
            } else {
                notes.push(
                    "the VMM is not jailed (a test guest): uid 0 without capabilities, in the host's namespaces and root"
                        .into(),
                );
            }
            let (vmm_per_thread, union) = vmm_syscalls();
            Ok(Report {
                id: id.to_string(),
                isolation: Isolation::Vm,
                status: state.status,
                started: procfs::start_time(state.pid),
                kernel: KernelReport {
                    workload_runs_on: "guest".into(),
                    guest,
                    host,
                },
                syscalls: SyscallReport {
                    vmm_per_thread,
                    vmm_union: Some(union),
                    vmm_mode: Some(config.seccomp.clone()),
                    container_profile,
                },
                memory: Some(MemoryReport {
                    vmm_rss_kib: process.rss_kib,
                    virtiofsd_rss_kib: helper_rss,
                    virtiofsd_pids: helpers,
                    total_kib: process.rss_kib + helper_rss,
                }),
                process,
                kvm_exits: kvm_exits.map(|v| {
                    v.into_iter()
                        .map(|s| VcpuStats {
                            index: s.index,
                            counters: s.exits(),
                        })
                        .collect()
                }),
                notes,
            })
        }
    }
}

/// The human table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<22} {v}");
    };
    row("id", r.id.clone());
    row("isolation", format!("{:?}", r.isolation).to_lowercase());
    row("status", format!("{:?}", r.status).to_lowercase());
    row(
        "started",
        r.started
            .map(|s| format!("{s} (unix seconds)"))
            .unwrap_or("-".into()),
    );
    row(
        "kernel",
        match &r.kernel.guest {
            Some(g) => format!("guest {g} (host {})", r.kernel.host),
            None => format!("host {}", r.kernel.host),
        },
    );
    if let Some(union) = r.syscalls.vmm_union {
        let per: Vec<String> = r
            .syscalls
            .vmm_per_thread
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row(
            "vmm syscalls",
            format!(
                "{union} distinct ({}), mode {}",
                per.join(", "),
                r.syscalls.vmm_mode.as_deref().unwrap_or("-")
            ),
        );
    }
    let p = &r.syscalls.container_profile;
    row(
        "container profile",
        match (&p.default_action, p.allowed) {
            (None, _) => "none (every host syscall)".into(),
            (Some(d), None) => format!("default {d}: everything not denied"),
            (Some(d), Some(n)) => format!("{n} allowed, default {d}"),
        },
    );
    let pr = &r.process;
    row("process", format!("{} (pid {})", pr.name, pr.pid));
    row("uid/gid", format!("{}/{}", pr.uid, pr.gid));
    row(
        "capabilities",
        format!(
            "eff {:#x} prm {:#x} bnd {:#x} inh {:#x} amb {:#x}",
            pr.cap_eff, pr.cap_prm, pr.cap_bnd, pr.cap_inh, pr.cap_amb
        ),
    );
    let filtered = pr.threads.iter().filter(|t| t.seccomp == 2).count();
    row(
        "seccomp",
        format!(
            "{filtered} of {} threads filtered, no_new_privs {}",
            pr.threads.len(),
            pr.no_new_privs
        ),
    );
    let own: Vec<&str> = pr
        .namespaces
        .iter()
        .filter(|(_, n)| !n.shared_with_host)
        .map(|(k, _)| k.as_str())
        .collect();
    row(
        "own namespaces",
        if own.is_empty() {
            "none (all the host's)".into()
        } else {
            own.join(" ")
        },
    );
    row("root", pr.root.clone());
    match &r.memory {
        Some(m) => row(
            "memory overhead",
            format!(
                "{} KiB (vmm {} KiB + virtiofsd {} KiB)",
                m.total_kib, m.vmm_rss_kib, m.virtiofsd_rss_kib
            ),
        ),
        None => row("memory (init rss)", format!("{} KiB", pr.rss_kib)),
    }
    for vcpu in r.kvm_exits.iter().flatten() {
        let exits: Vec<String> = vcpu
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        row(&format!("kvm vcpu{}", vcpu.index), exits.join(" "));
    }
    for note in &r.notes {
        row("note", note.clone());
    }
    out
}
