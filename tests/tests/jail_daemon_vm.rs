//! The jailed vmm daemon's failure path, without booting a guest (needs root and
//! /dev/kvm): `husk create --isolation vm` with a kernel that is not an ELF file (given
//! through a symlink) gets
//! through the launcher (share, virtiofsd, `Jail::enter`) and fails in the jailed child
//! when it loads the kernel. The error must name the cause, and nothing may be left: no
//! state, mount or process under `--root` (virtiofsd included), no jail directory, no
//! cgroup.

use std::path::Path;
use std::time::Duration;

use husk_tests::cli::{bundle, wait_child, Guest, Husk};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn a_jailed_vmm_that_fails_to_boot_leaves_nothing() {
    let kernel_dir = tempfile::tempdir().unwrap();
    // Given through a symlink, as the build output's kernel is (a link into a cache):
    // the jail must hold the file, not the link (whose target it cannot reach).
    let file = kernel_dir.path().join("vmlinux-file");
    std::fs::write(&file, b"not an ELF kernel").unwrap();
    let kernel = kernel_dir.path().join("vmlinux");
    std::os::unix::fs::symlink(&file, &kernel).unwrap();
    let mut h = Husk::new(Guest::MicroVm).with_global_args(&["--kernel", kernel.to_str().unwrap()]);
    let b = bundle("true");
    let id = "jail-fail";
    let out = h.run_for(
        &[
            "create",
            "--no-template",
            "-b",
            b.path().to_str().unwrap(),
            id,
        ],
        TIMEOUT,
    );
    assert_ne!(out.code, Some(0), "create succeeded: {out:?}");
    eprintln!("create failed as it should: {}", out.stderr.trim());
    // The jailed child read the file: it is not an ELF (not "does not exist").
    assert!(
        out.stderr.contains("/vmlinux") && out.stderr.contains("ELF"),
        "the error must say what failed: {}",
        out.stderr
    );
    h.assert_nothing_left();
    assert_no_cgroup(id);
}

fn assert_no_cgroup(id: &str) {
    for controller in husk::jailer::cgroup::CONTROLLERS {
        let dir = husk::jailer::cgroup::cgroup_dir(Path::new("/sys/fs/cgroup"), controller, id);
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
}

#[test]
fn a_launcher_that_fails_before_the_jail_leaves_nothing() {
    let mut h = Husk::new(Guest::MicroVm);
    let b = bundle("true");
    let id = "jail-nofsd";
    let missing = "/nonexistent/husk-test/virtiofsd";
    h.track(&[id]);
    let dir = tempfile::tempdir().unwrap();
    let err_file = dir.path().join("err");
    let mut create = h
        .command(&[
            "create",
            "--no-template",
            "-b",
            b.path().to_str().unwrap(),
            id,
        ])
        .env("HUSK_VIRTIOFSD", missing)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let code = wait_child(&mut create, TIMEOUT);
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert_ne!(code, Some(0), "create succeeded: {err}");
    assert!(
        err.contains(missing),
        "the error must name virtiofsd: {err}"
    );
    h.assert_nothing_left();
    assert_no_cgroup(id);
}
