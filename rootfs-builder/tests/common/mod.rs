//! Helpers shared by the husk-rootfs CLI tests.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};
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

/// Builds twice from the same agent and `--add` tree, the second time after their mtimes
/// and ctimes moved on, and asserts identical bytes. `build(dir, name, agent, adds)`
/// writes `<dir>/<name>.<ext>` and returns its path.
pub fn assert_reproducible(ext: &str, build: impl Fn(&Path, &str, &Path, &[String]) -> PathBuf) {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent");
    std::fs::copy(STATIC_BINARY, &agent).unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("b"), "b").unwrap();
    std::fs::write(tree.join("a"), "a").unwrap();
    let adds = [format!("{}:/data", tree.display())];

    let first = build(dir.path(), &format!("first.{ext}"), &agent, &adds);
    let later = SystemTime::now() + Duration::from_secs(3600);
    for path in [&agent, &tree.join("a")] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    // ctime moves on too, whole seconds apart.
    std::thread::sleep(Duration::from_millis(1100));
    let second = build(dir.path(), &format!("second.{ext}"), &agent, &adds);
    let (first, second) = (
        std::fs::read(first).unwrap(),
        std::fs::read(second).unwrap(),
    );
    assert!(first == second, "two builds from the same inputs differ");
}

/// A host tree and a single file to `--add` (at `/opt/data` and `/etc/single`), made in
/// `dir`: `file.txt` (0640, "hello"), `sub/tool` (0700), `relative-link` -> `file.txt`,
/// `absolute-link` -> `/bin/busybox`; `single` holds "one file".
pub fn sample_adds(dir: &Path) -> [String; 2] {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("file.txt"), "hello").unwrap();
    std::fs::set_permissions(src.join("file.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(src.join("sub/tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("sub/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
    symlink("file.txt", src.join("relative-link")).unwrap();
    symlink("/bin/busybox", src.join("absolute-link")).unwrap();
    let single = dir.join("single");
    std::fs::write(&single, "one file").unwrap();
    [
        format!("{}:/opt/data", src.display()),
        format!("{}:/etc/single", single.display()),
    ]
}
