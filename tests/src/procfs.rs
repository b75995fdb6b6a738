//! `/proc` read the plain way, to check what husk reports against the kernel's own
//! word (so not through husk's parser).

/// The value of `key:` in `/proc/<path>/status` (`path` is a pid, or `pid/task/tid`),
/// trimmed.
pub fn status_field(path: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{path}/status"))
        .unwrap_or_else(|e| panic!("/proc/{path}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in /proc/{path}/status"))
}

/// The effective uid in `/proc/<path>/status`.
pub fn effective_uid(path: &str) -> i64 {
    let uids = status_field(path, "Uid");
    uids.split_whitespace()
        .nth(1)
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("bad Uid line in /proc/{path}/status: {uids:?}"))
}
