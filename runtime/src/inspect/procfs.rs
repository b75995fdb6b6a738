//! What `/proc/PID` says about a process's confinement: ids, capabilities, seccomp,
//! namespaces, root, memory and start time. Parsers take text so they are tested
//! without a process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lines of `/proc/PID/status` that matter for confinement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Real, effective, saved, filesystem uid.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    /// Capability sets as masks: inheritable, permitted, effective, bounding, ambient.
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    pub no_new_privs: bool,
    /// Resident memory in KiB.
    pub rss_kib: u64,
}

fn ids(value: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = value
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// Parses `/proc/PID/status`; missing lines leave defaults (a kernel without seccomp).
pub fn parse_status(text: &str) -> Result<Status, String> {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || format!("bad {key} line in /proc status: {line:?}");
        let hex = || u64::from_str_radix(value, 16).map_err(|_| bad());
        match key {
            "Uid" => s.uid = ids(value).ok_or_else(bad)?,
            "Gid" => s.gid = ids(value).ok_or_else(bad)?,
            "CapInh" => s.cap_inh = hex()?,
            "CapPrm" => s.cap_prm = hex()?,
            "CapEff" => s.cap_eff = hex()?,
            "CapBnd" => s.cap_bnd = hex()?,
            "CapAmb" => s.cap_amb = hex()?,
            "Seccomp" => s.seccomp = value.parse().map_err(|_| bad())?,
            "NoNewPrivs" => s.no_new_privs = value == "1",
            "VmRSS" => {
                s.rss_kib = value
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|_| bad())?
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Reads and parses `/proc/PID/status` (or a thread's, `/proc/PID/task/TID/status`).
pub fn status(dir: &Path) -> std::io::Result<Status> {
    let path = dir.join("status");
    let text = std::fs::read_to_string(&path)?;
    parse_status(&text).map_err(std::io::Error::other)
}

/// The namespace kinds a confinement report compares with the host's.
pub const NAMESPACES: [&str; 7] = ["mnt", "pid", "net", "ipc", "uts", "user", "cgroup"];

/// `/proc/PID/ns/*` links (`"mnt:[4026531841]"`), by kind.
pub fn namespaces(pid: i32) -> BTreeMap<String, String> {
    NAMESPACES
        .iter()
        .filter_map(|ns| {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok()?;
            Some((ns.to_string(), link.to_string_lossy().into_owned()))
        })
        .collect()
}

/// `/proc/PID/root` as the process sees its root, from the host.
pub fn root(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/root")).ok()
}

/// The thread ids of a process.
pub fn threads(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// Every descendant of `pid` (children, their children...), from `/proc/*/task/*/children`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for tid in threads(p) {
            let children = std::fs::read_to_string(format!("/proc/{p}/task/{tid}/children"))
                .unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(child);
                todo.push(child);
            }
        }
    }
    out
}

/// The process name (`/proc/PID/comm`).
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks after boot). The command
/// name (field 2) may hold spaces and parentheses: fields are counted after the last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3.. ; field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// `btime` of `/proc/stat`: the boot time, seconds since the epoch.
pub fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// When `pid` started, seconds since the epoch.
pub fn start_time(pid: i32) -> Option<u64> {
    let ticks = parse_start_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(boot + ticks / hz)
}

/// The kernel release of the host (`uname -r`).
pub fn host_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The release in a kernel image's banner (`Linux version 6.1.0 (...)`), read from the
/// file: the guest kernel is an uncompressed ELF `vmlinux`, so the string is in clear.
pub fn kernel_image_release(image: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let at = image.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let rest = &image[at..image.len().min(at + 64)];
    let end = rest.iter().position(|&b| b == b' ' || b == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\thusk-vcpu0\nUmask:\t0022\nState:\tS (sleeping)\n\
Uid:\t1000123\t1000123\t1000123\t1000123\nGid:\t1000123\t1000123\t1000123\t1000123\n\
VmRSS:\t  140172 kB\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn parses_ids_capabilities_seccomp_and_rss() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.uid, [1_000_123; 4]);
        assert_eq!(s.gid[3], 1_000_123);
        assert_eq!((s.cap_eff, s.cap_prm, s.cap_inh, s.cap_amb), (0, 0, 0, 0));
        assert_eq!(s.cap_bnd, 0x1ff_ffff_ffff);
        assert_eq!(s.seccomp, 2);
        assert!(s.no_new_privs);
        assert_eq!(s.rss_kib, 140_172);
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = parse_status("CapEff:\tzz\n").unwrap_err();
        assert!(err.contains("CapEff"), "{err}");
        let err = parse_status("Uid:\t1 2\n").unwrap_err();
        assert!(err.contains("Uid"), "{err}");
    }

    #[test]
    fn start_ticks_skip_a_command_name_with_spaces_and_parens() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn reads_this_process() {
        let s = status(Path::new("/proc/self")).unwrap();
        assert!(s.rss_kib > 0);
        let me = std::process::id() as i32;
        assert!(threads(me).contains(&me));
        assert!(namespaces(me).contains_key("mnt"));
        assert!(start_time(me).unwrap() > 1_600_000_000);
        assert!(!host_kernel().is_empty());
    }

    #[test]
    fn finds_the_release_in_a_kernel_banner() {
        let mut image = vec![0u8; 100];
        image.extend_from_slice(b"Linux version 6.1.158-husk (root@x) #1 SMP\0");
        assert_eq!(
            kernel_image_release(&image).as_deref(),
            Some("6.1.158-husk")
        );
        assert_eq!(kernel_image_release(b"no banner"), None);
    }
}
