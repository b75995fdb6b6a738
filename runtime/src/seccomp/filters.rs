//! The BPF programs `build.rs` compiled, and the allowlists they came from.

use seccompiler::{sock_filter, BpfProgram};

use super::{policy, SeccompMode, ThreadKind};

macro_rules! compiled {
    ($name:literal) => {
        (
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/", $name, ".bpf")).as_slice(),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/", $name, ".log.bpf")).as_slice(),
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/seccomp/",
                $name,
                ".json"
            )),
        )
    };
}

/// (kill program, log program, JSON source) of a thread kind.
fn compiled(kind: ThreadKind) -> (&'static [u8], &'static [u8], &'static str) {
    match kind {
        ThreadKind::Vcpu => compiled!("vcpu"),
        ThreadKind::EventLoop => compiled!("event_loop"),
        ThreadKind::Control => compiled!("control"),
    }
}

/// Decodes the 8-byte little-endian records `build.rs` wrote.
fn decode(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|r| sock_filter {
            code: u16::from_le_bytes([r[0], r[1]]),
            jt: r[2],
            jf: r[3],
            k: u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
        })
        .collect()
}

/// The BPF program of `kind` for `mode`; `None` for [`SeccompMode::Off`].
pub fn bpf(kind: ThreadKind, mode: SeccompMode) -> Option<BpfProgram> {
    let (kill, log, _) = compiled(kind);
    match mode {
        SeccompMode::Kill => Some(decode(kill)),
        SeccompMode::Log => Some(decode(log)),
        SeccompMode::Off => None,
    }
}

/// The syscalls `kind` may call (some only with the arguments its JSON names), sorted:
/// the host kernel surface a guest can reach through that thread.
pub fn syscalls(kind: ThreadKind) -> Vec<String> {
    let (_, _, json) = compiled(kind);
    let file = format!("runtime/seccomp/{}.json", kind.name());
    // build.rs ran the same check on the same text, so this cannot fail in a built crate.
    policy::check(&file, kind.name(), json)
        .map(|s| s.syscalls)
        .unwrap_or_default()
}

/// The number of rules in `kind`'s JSON.
pub fn rule_count(kind: ThreadKind) -> usize {
    let (_, _, json) = compiled(kind);
    policy::check(kind.name(), kind.name(), json)
        .map(|s| s.rules)
        .unwrap_or_default()
}
