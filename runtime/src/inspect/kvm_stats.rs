//! KVM's per-vCPU binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst
//! section 4.133): a read-only fd whose contents are a header, an id string, one
//! descriptor per statistic (flags, exponent, size, offset, bucket size, then a
//! `name_size`-byte NUL-padded name) and a data block of u64s.
//!
//! The vCPU fds live on the vCPU threads, so each thread opens its stats fd before its
//! seccomp filter is installed and registers it here ([`register_vcpu`]); the daemon's
//! control thread then reads them with `pread` ([`read_all`]) for `husk inspect`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// `_IO(KVMIO, 0xce)`: kvm-ioctls 0.25 does not wrap it.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAECE;
/// `struct kvm_stats_header`: six u32.
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name: u32 flags, s16 exponent, u16 size, u32
/// offset, u32 bucket_size.
const DESC_FIXED_SIZE: usize = 16;
/// `KVM_STATS_TYPE_MASK`: cumulative, instant, peak, linear and log histograms.
const TYPE_MASK: u32 = 0xf;
const TYPE_CUMULATIVE: u32 = 0;

/// Errors reading KVM statistics.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KvmStatsError {
    /// KVM_GET_STATS_FD failed on vCPU {index}: {source} (needs Linux 5.14 or later)
    Open { index: u8, source: std::io::Error },
    /// reading the stats of vCPU {index}: {source}
    Read { index: u8, source: std::io::Error },
    /// the stats of vCPU {index} are malformed: {detail}
    Malformed { index: u8, detail: String },
}

/// One vCPU's cumulative counters (exits by reason and the rest), by KVM's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub index: u8,
    pub counters: BTreeMap<String, u64>,
}

impl VcpuStats {
    /// The exit counters: `exits` (all) and every `*_exits` (by reason).
    pub fn exits(&self) -> BTreeMap<String, u64> {
        self.counters
            .iter()
            .filter(|(name, _)| *name == "exits" || name.ends_with("_exits"))
            .map(|(name, value)| (name.clone(), *value))
            .collect()
    }
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes the whole contents of a stats fd (read from offset 0): the single-valued
/// cumulative, instant and peak statistics by name. Histograms are skipped.
pub fn decode(buf: &[u8]) -> Result<BTreeMap<String, u64>, String> {
    if buf.len() < HEADER_SIZE {
        return Err(format!("{} bytes, shorter than the header", buf.len()));
    }
    let field = |i: usize| u32_at(buf, i * 4).map(|v| v as usize).unwrap_or(0);
    let (name_size, num_desc, desc_offset, data_offset) = (field(1), field(2), field(4), field(5));
    let desc_size = DESC_FIXED_SIZE + name_size;
    let mut out = BTreeMap::new();
    for i in 0..num_desc {
        let at = desc_offset + i * desc_size;
        let desc = buf.get(at..at + desc_size).ok_or_else(|| {
            format!(
                "descriptor {i} at {at} is past the end ({} bytes)",
                buf.len()
            )
        })?;
        let flags = u32_at(desc, 0).unwrap_or(0);
        let size = u16_at(desc, 6).unwrap_or(0);
        let offset = u32_at(desc, 8).unwrap_or(0) as usize;
        let name_bytes = &desc[DESC_FIXED_SIZE..];
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        if flags & TYPE_MASK > 2 || size != 1 {
            continue; // a histogram: not a counter
        }
        let value = u64_at(buf, data_offset + offset).ok_or_else(|| {
            format!(
                "the value of {name} at {} is past the end",
                data_offset + offset
            )
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

/// True if the statistic's flags say it only grows (for documentation of the report).
pub fn is_cumulative(flags: u32) -> bool {
    flags & TYPE_MASK == TYPE_CUMULATIVE
}

/// Opens the stats fd of a vCPU fd.
pub fn open(index: u8, vcpu_fd: RawFd) -> Result<File, KvmStatsError> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; `vcpu_fd`
    // is an open vCPU fd owned by the caller.
    let fd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD as _, 0) };
    if fd < 0 {
        return Err(KvmStatsError::Open {
            index,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Reads and decodes one stats fd with `pread` (no seek: the fd may be read by several
/// threads, and the control thread's filter has no `lseek`).
pub fn read(index: u8, file: &File) -> Result<VcpuStats, KvmStatsError> {
    let read_err = |source| KvmStatsError::Read { index, source };
    let mut header = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut header, 0).map_err(read_err)?;
    let field = |i: usize| u32_at(&header, i * 4).unwrap_or(0) as usize;
    let (name_size, num_desc, desc_offset, data_offset) = (field(1), field(2), field(4), field(5));
    // The data block is last; each statistic's values are at most a few hundred u64s.
    let descs_end = desc_offset + num_desc * (DESC_FIXED_SIZE + name_size);
    let mut len = descs_end.max(data_offset);
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).map_err(read_err)?;
    let mut data_len = 0usize;
    for i in 0..num_desc {
        let at = desc_offset + i * (DESC_FIXED_SIZE + name_size);
        let size = u16_at(&buf, at + 6).unwrap_or(0) as usize;
        let offset = u32_at(&buf, at + 8).unwrap_or(0) as usize;
        data_len = data_len.max(offset + size * 8);
    }
    len = data_offset + data_len;
    buf.resize(len, 0);
    file.read_exact_at(&mut buf[data_offset..], data_offset as u64)
        .map_err(read_err)?;
    let counters = decode(&buf).map_err(|detail| KvmStatsError::Malformed { index, detail })?;
    Ok(VcpuStats { index, counters })
}

/// The stats fds of this process's vCPUs.
static VCPUS: Mutex<Vec<(u8, File)>> = Mutex::new(Vec::new());

/// Called by a vCPU thread before its seccomp filter (which has no ioctl for this).
/// A failure is logged: the statistics are a report, not a reason to stop the guest.
pub fn register_vcpu(index: u8, vcpu_fd: &impl AsRawFd) {
    match open(index, vcpu_fd.as_raw_fd()) {
        Ok(file) => {
            let mut vcpus = VCPUS.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.retain(|(i, _)| *i != index);
            vcpus.push((index, file));
        }
        Err(e) => log::warn!("{e}; husk inspect will show no exit counters"),
    }
}

/// The counters of every registered vCPU, by index.
pub fn read_all() -> Result<Vec<VcpuStats>, KvmStatsError> {
    let vcpus = VCPUS.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<VcpuStats> = vcpus
        .iter()
        .map(|(index, file)| read(*index, file))
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|s| s.index);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stats file as api.rst lays it out: header, id, descriptors, data.
    fn sample(name_size: usize, stats: &[(&str, u32, u16, &[u64])]) -> Vec<u8> {
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + 48;
        let desc_size = DESC_FIXED_SIZE + name_size;
        let data_offset = desc_offset + stats.len() * desc_size;
        let mut buf = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let mut id = b"kvm-1234/vcpu_0".to_vec();
        id.resize(48, 0);
        buf.extend_from_slice(&id);
        let mut data = Vec::new();
        for (name, flags, size, values) in stats {
            buf.extend_from_slice(&flags.to_le_bytes());
            buf.extend_from_slice(&0i16.to_le_bytes());
            buf.extend_from_slice(&size.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            buf.extend_from_slice(&n);
            for v in *values {
                data.extend_from_slice(&v.to_le_bytes());
            }
        }
        buf.extend_from_slice(&data);
        buf
    }

    #[test]
    fn decodes_counters_by_name_and_skips_histograms() {
        let buf = sample(
            48,
            &[
                ("exits", TYPE_CUMULATIVE, 1, &[1234]),
                ("io_exits", TYPE_CUMULATIVE, 1, &[77]),
                ("halt_poll_success_hist", 4, 4, &[1, 2, 3, 4]),
                ("mmio_exits", TYPE_CUMULATIVE, 1, &[5]),
                ("blocking", 1, 1, &[1]),
            ],
        );
        let counters = decode(&buf).unwrap();
        assert_eq!(counters.get("exits"), Some(&1234));
        assert_eq!(counters.get("io_exits"), Some(&77));
        // mmio_exits comes after a 4-value histogram: offsets must be followed, not assumed.
        assert_eq!(counters.get("mmio_exits"), Some(&5));
        assert_eq!(counters.get("blocking"), Some(&1));
        assert!(!counters.contains_key("halt_poll_success_hist"));
        let stats = VcpuStats { index: 0, counters };
        let exits: Vec<_> = stats.exits().into_keys().collect();
        assert_eq!(exits, ["exits", "io_exits", "mmio_exits"]);
    }

    #[test]
    fn a_truncated_buffer_is_an_error_not_a_panic() {
        let buf = sample(48, &[("exits", TYPE_CUMULATIVE, 1, &[1])]);
        for len in [0, 10, HEADER_SIZE + 10, buf.len() - 3] {
            assert!(decode(&buf[..len]).is_err(), "len {len}");
        }
        assert!(is_cumulative(TYPE_CUMULATIVE));
    }

    #[test]
    fn reads_a_real_vcpu_stats_fd() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            panic!("/dev/kvm is needed for this test (tier 1 runs on KVM hosts)");
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let file = open(0, vcpu.as_raw_fd()).unwrap();
        let stats = read(0, &file).unwrap();
        assert_eq!(
            stats.counters.get("exits"),
            Some(&0),
            "{:?}",
            stats.counters
        );
        assert!(
            stats.exits().contains_key("io_exits"),
            "{:?}",
            stats.counters
        );
    }
}
