//! `husk-rootfs bundle`: the spec parses and the rootfs runs a shell on the host.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{husk_rootfs, husk_rootfs_ok, require_root, stderr};
use oci_spec::runtime::Spec;

#[test]
fn config_json_loads_with_the_given_args() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    husk_rootfs_ok(&[
        "bundle",
        "--out",
        out.to_str().unwrap(),
        "--",
        "echo",
        "hi there",
    ]);
    let spec = Spec::load(out.join("config.json")).expect("config.json is a valid runtime spec");
    let process = spec.process().as_ref().expect("process");
    assert_eq!(process.args().clone().unwrap(), ["echo", "hi there"]);
    assert_eq!(process.terminal(), Some(false));
    let root = spec.root().as_ref().expect("root");
    assert_eq!(root.path(), Path::new("rootfs"));
    assert!(
        !spec.mounts().clone().unwrap_or_default().is_empty(),
        "default mounts missing"
    );
    assert!(spec.linux().is_some(), "default linux section missing");
}

#[test]
fn args_default_to_sh() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    husk_rootfs_ok(&["bundle", "--out", out.to_str().unwrap()]);
    let spec = Spec::load(out.join("config.json")).unwrap();
    assert_eq!(
        spec.process().as_ref().unwrap().args().clone().unwrap(),
        ["sh"]
    );
}

#[test]
fn rootfs_sh_runs_echo_ok_in_a_chroot() {
    require_root("chroot");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    husk_rootfs_ok(&["bundle", "--out", out.to_str().unwrap()]);
    let rootfs = out.join("rootfs");
    let sh = Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "-c", "echo ok"])
        .output()
        .unwrap();
    assert!(sh.status.success(), "chroot sh failed: {}", stderr(&sh));
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "ok\n");

    // The applet links and /etc files make ordinary commands work too.
    let id = Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/bin/id", "-un"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&id.stdout),
        "root\n",
        "{}",
        stderr(&id)
    );
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nobody:x:65534"), "{passwd}");
    for dir in ["proc", "sys", "dev", "tmp"] {
        let entries = fs::read_dir(rootfs.join(dir)).unwrap().count();
        assert_eq!(entries, 0, "/{dir} is not an empty directory");
    }
}

#[test]
fn a_non_empty_out_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    husk_rootfs_ok(&["bundle", "--out", out.to_str().unwrap()]);
    let again = husk_rootfs(&["bundle", "--out", out.to_str().unwrap(), "--", "true"]);
    assert!(
        !again.status.success(),
        "overwrote a non-empty bundle without --force"
    );
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    husk_rootfs_ok(&[
        "bundle",
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--",
        "true",
    ]);
    let spec = Spec::load(out.join("config.json")).unwrap();
    assert_eq!(
        spec.process().as_ref().unwrap().args().clone().unwrap(),
        ["true"]
    );
}

#[test]
fn a_missing_busybox_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let args = [
        "bundle",
        "--out",
        out.to_str().unwrap(),
        "--busybox",
        "/nonexistent/busybox",
    ];
    let result = husk_rootfs(&args);
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("busybox-static"),
        "{}",
        stderr(&result)
    );
}
