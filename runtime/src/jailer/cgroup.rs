//! The vmm's cgroup (v1, as on these hosts: one directory per controller under
//! `<cgroup root>/<controller>/husk/<id>`), sized from the container's limits plus what the
//! VMM itself needs on top of the guest.

use std::path::{Path, PathBuf};

/// Controllers the jail uses.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// Memory the VMM process needs besides guest RAM: its own heap, thread stacks, device
/// buffers, the vsock connections' buffers, page tables of the guest mapping.
pub const VMM_MEMORY_OVERHEAD: u64 = 64 << 20;
/// CPU the VMM threads (event loop, control) may use besides the vCPUs: 10% of one CPU.
pub const VMM_CPU_OVERHEAD_PERMILLE: u64 = 100;
/// Tasks besides the vCPU threads (event loop, control, scoped helper threads).
pub const VMM_PIDS_OVERHEAD: u64 = 16;
/// The CFS period used when the spec gives none.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// What the VM was given, from the OCI spec's `linux.resources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u8,
    /// Guest RAM (already sized from the spec's memory limit by the caller).
    pub guest_mem_mib: u64,
    /// `cpu.quota` / `cpu.period` from the spec; no quota means "the vCPUs' worth".
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: Option<u64>,
}

/// The values written to the cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids_max: u64,
}

impl CgroupLimits {
    pub fn for_vm(r: &Resources) -> Self {
        let period = r
            .cpu_period_us
            .filter(|p| *p > 0)
            .unwrap_or(DEFAULT_CPU_PERIOD_US);
        let guest_quota = match r.cpu_quota_us {
            Some(q) if q > 0 => q as u64,
            // No limit in the spec: the vCPUs can use at most one CPU each anyway.
            _ => u64::from(r.vcpus) * period,
        };
        Self {
            memory_bytes: (r.guest_mem_mib << 20) + VMM_MEMORY_OVERHEAD,
            cpu_quota_us: guest_quota + period * VMM_CPU_OVERHEAD_PERMILLE / 1000,
            cpu_period_us: period,
            pids_max: u64::from(r.vcpus) + VMM_PIDS_OVERHEAD,
        }
    }

    /// (controller, file, value) in the order they must be written (period before quota).
    pub fn files(&self) -> [(&'static str, &'static str, String); 4] {
        [
            ("cpu", "cpu.cfs_period_us", self.cpu_period_us.to_string()),
            ("cpu", "cpu.cfs_quota_us", self.cpu_quota_us.to_string()),
            (
                "memory",
                "memory.limit_in_bytes",
                self.memory_bytes.to_string(),
            ),
            ("pids", "pids.max", self.pids_max.to_string()),
        ]
    }
}

/// `<cgroup root>/<controller>/husk/<id>`.
pub fn cgroup_dir(cgroup_root: &Path, controller: &str, id: &str) -> PathBuf {
    cgroup_root.join(controller).join("husk").join(id)
}
