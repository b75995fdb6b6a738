//! Helpers shared by the husk-rootfs CLI tests.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::Path;
use std::process::{Command, Output};

/// A static binary that stands in for the agent: Debian's busybox-static.
pub const STATIC_BINARY: &str = "/bin/busybox";

/// Runs `husk-rootfs` with `args` and returns its output.
pub fn husk_rootfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_husk-rootfs"))
        .args(args)
        .output()
        .expect("running husk-rootfs")
}

/// Runs `husk-rootfs` and fails the test, showing stderr, unless it succeeds.
pub fn husk_rootfs_ok(args: &[&str]) {
    let out = husk_rootfs(args);
    assert!(
        out.status.success(),
        "husk-rootfs {args:?} failed: {}",
        stderr(&out)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails (never skips) when not root: these tests create device nodes or chroot.
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test must run as root ({why}): run `cargo test -p husk-rootfs` as root"
    );
}

/// Runs a host tool and returns its stdout, failing the test with its stderr otherwise.
pub fn run(program: &str, args: &[&str], cwd: &Path, stdin: Option<&Path>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    if let Some(input) = stdin {
        cmd.stdin(std::fs::File::open(input).expect("opening stdin file"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        stderr(&out)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
