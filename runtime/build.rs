//! Compiles the per-thread seccomp allowlists in `seccomp/*.json` to BPF with seccompiler,
//! so the daemon embeds ready programs and a broken filter fails the build, not a VM start.
//! Each filter is compiled twice: as written (default action: kill the process) and with
//! the default action "log" for the development-only `--seccomp log` mode.
//! Output: `$OUT_DIR/seccomp/<thread>.bpf` and `<thread>.log.bpf`, the `sock_filter`
//! instructions as 8-byte little-endian records (the layout `seccomp::filters` decodes).

use std::path::{Path, PathBuf};

#[path = "src/seccomp/policy.rs"]
#[allow(dead_code)]
mod policy;

/// One JSON file per thread kind; keep in sync with `seccomp::ThreadKind`.
const THREADS: [&str; 3] = ["vcpu", "event_loop", "control"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/seccomp/policy.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let target: seccompiler::TargetArch = arch.as_str().try_into().unwrap_or_else(|_| {
        panic!("seccompiler has no syscall table for target arch {arch}; husk supports x86_64")
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("seccomp");
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/seccomp");
    for thread in THREADS {
        let file = format!("seccomp/{thread}.json");
        println!("cargo:rerun-if-changed={file}");
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {file}: {e}; every thread kind needs its filter"));
        if let Err(e) = policy::check(&file, thread, &text) {
            panic!("{e}");
        }
        compile(
            &file,
            thread,
            &text,
            target,
            &out.join(format!("{thread}.bpf")),
        );
        let log = policy::with_log_default(thread, &text).unwrap_or_else(|e| panic!("{e}"));
        compile(
            &file,
            thread,
            &log,
            target,
            &out.join(format!("{thread}.log.bpf")),
        );
    }
}

fn compile(file: &str, thread: &str, json: &str, arch: seccompiler::TargetArch, dest: &Path) {
    let mut map = seccompiler::compile_from_json(json.as_bytes(), arch)
        .unwrap_or_else(|e| panic!("seccompiler rejected {file}: {e}"));
    let program = map
        .remove(thread)
        .unwrap_or_else(|| panic!("{file} has no filter named {thread}"));
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for insn in program {
        bytes.extend_from_slice(&insn.code.to_le_bytes());
        bytes.push(insn.jt);
        bytes.push(insn.jf);
        bytes.extend_from_slice(&insn.k.to_le_bytes());
    }
    std::fs::write(dest, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
