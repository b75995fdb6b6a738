//! `Stats`: the sandbox's resource usage (libcgroups' statistics on the host, or the
//! guest's, in the same JSON shape) as containerd's cgroup v1 `Metrics`.

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use serde_json::Value;

fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Converts the sandbox's stats; fields it does not report stay zero.
pub fn from_stats(stats: &Value) -> Metrics {
    let mut m = Metrics::new();
    let mut pids = PidsStat::new();
    pids.current = num(stats, "/pids/current");
    pids.limit = num(stats, "/pids/limit");
    m.pids = Some(pids).into();
    let mut usage = CPUUsage::new();
    usage.total = num(stats, "/cpu/usage/usage_total");
    usage.user = num(stats, "/cpu/usage/usage_user");
    usage.kernel = num(stats, "/cpu/usage/usage_kernel");
    usage.per_cpu = stats
        .pointer("/cpu/usage/per_core_usage_total")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut cpu = CPUStat::new();
    cpu.usage = Some(usage).into();
    m.cpu = Some(cpu).into();
    let mut entry = MemoryEntry::new();
    entry.usage = num(stats, "/memory/memory/usage");
    entry.max = num(stats, "/memory/memory/max_usage");
    entry.limit = num(stats, "/memory/memory/limit");
    entry.failcnt = num(stats, "/memory/memory/fail_count");
    let mut memory = MemoryStat::new();
    memory.cache = num(stats, "/memory/stats/cache");
    memory.rss = num(stats, "/memory/stats/rss");
    memory.usage = Some(entry).into();
    m.memory = Some(memory).into();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_fields_it_knows() {
        let stats = serde_json::json!({
            "pids": {"current": 3, "limit": 100},
            "cpu": {"usage": {"usage_total": 9, "usage_user": 5, "usage_kernel": 4, "per_core_usage_total": [4, 5]}},
            "memory": {"memory": {"usage": 4096, "limit": 8192}, "stats": {"rss": 1024}}
        });
        let m = from_stats(&stats);
        assert_eq!((m.pids.current, m.pids.limit), (3, 100));
        assert_eq!(m.cpu.usage.total, 9);
        assert_eq!(m.cpu.usage.per_cpu, vec![4, 5]);
        assert_eq!(
            (m.memory.usage.usage, m.memory.usage.limit, m.memory.rss),
            (4096, 8192, 1024)
        );
    }
}
