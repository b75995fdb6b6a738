//! `husk-rootfs initramfs`, checked with Debian's GNU `cpio`.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{husk_rootfs, husk_rootfs_ok, require_root, run, stderr, STATIC_BINARY};

fn build(dir: &Path, name: &str, agent: &Path, adds: &[String]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "initramfs",
        "--agent",
        agent.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for add in adds {
        args.extend(["--add", add.as_str()]);
    }
    husk_rootfs_ok(&args);
    out
}

#[test]
fn cpio_lists_init_the_agent_dirs_and_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let archive = build(dir.path(), "initramfs.cpio", Path::new(STATIC_BINARY), &[]);
    let listing = run("cpio", &["-t", "--quiet"], dir.path(), Some(&archive));
    let names: Vec<&str> = listing.lines().collect();
    for expected in [
        "init",
        "proc",
        "sys",
        "dev",
        "dev/console",
        "tmp",
        "run",
        "etc",
        "mnt",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are not in sorted order");
}

#[test]
fn init_is_a_0755_regular_file_and_console_a_char_device_5_1() {
    require_root("extracting /dev/console with cpio needs mknod");
    let dir = tempfile::tempdir().unwrap();
    let archive = build(dir.path(), "initramfs.cpio", Path::new(STATIC_BINARY), &[]);
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    run(
        "cpio",
        &["-i", "-d", "--quiet", "--no-absolute-filenames"],
        &root,
        Some(&archive),
    );

    let init = fs::symlink_metadata(root.join("init")).unwrap();
    assert!(init.file_type().is_file(), "init is not a regular file");
    assert_eq!(init.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read(root.join("init")).unwrap(),
        fs::read(STATIC_BINARY).unwrap()
    );

    let console = fs::symlink_metadata(root.join("dev/console")).unwrap();
    assert!(
        console.file_type().is_char_device(),
        "dev/console is not a char device"
    );
    let rdev = console.rdev();
    assert_eq!(
        (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
        (5, 1)
    );
    assert_eq!(console.mode() & 0o7777, 0o600);

    let listing = run("cpio", &["-tv", "--quiet"], dir.path(), Some(&archive));
    for line in listing.lines() {
        let owner: Vec<&str> = line.split_whitespace().skip(2).take(2).collect();
        assert_eq!(owner, ["root", "root"], "{line}");
        assert!(line.contains(" 1970 "), "mtime is not 0: {line}");
    }
}

#[test]
fn same_inputs_give_identical_bytes_whatever_the_file_times() {
    common::assert_reproducible("cpio", build);
}

#[test]
fn add_keeps_symlinks_modes_and_nested_trees() {
    let dir = tempfile::tempdir().unwrap();
    let adds = common::sample_adds(dir.path());
    let archive = build(
        dir.path(),
        "initramfs.cpio",
        Path::new(STATIC_BINARY),
        &adds,
    );

    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    // Extract everything but the device node, so this part runs without root too.
    let args = [
        "-i",
        "-d",
        "--quiet",
        "--no-absolute-filenames",
        "-f",
        "dev/console",
    ];
    run("cpio", &args, &root, Some(&archive));

    let data = root.join("opt/data");
    assert_eq!(
        fs::read_link(data.join("relative-link")).unwrap(),
        Path::new("file.txt")
    );
    assert_eq!(
        fs::read_link(data.join("absolute-link")).unwrap(),
        Path::new("/bin/busybox")
    );
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&data.join("file.txt")), 0o640);
    assert_eq!(mode(&data.join("sub/tool")), 0o700);
    assert_eq!(fs::read_to_string(data.join("file.txt")).unwrap(), "hello");
    assert_eq!(
        fs::read_to_string(root.join("etc/single")).unwrap(),
        "one file"
    );
    assert!(root.join("init").is_file(), "the agent is still /init");
}

#[test]
fn a_missing_agent_is_named_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("initramfs.cpio");
    let missing = "/nonexistent/husk-agent";
    let result = husk_rootfs(&[
        "initramfs",
        "--agent",
        missing,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    assert!(stderr(&result).contains(missing), "{}", stderr(&result));
    assert!(!out.exists(), "a failed build left {}", out.display());
}

#[test]
fn a_missing_add_source_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("initramfs.cpio");
    let add = "/nonexistent/tree:/data";
    let args = [
        "initramfs",
        "--agent",
        STATIC_BINARY,
        "--out",
        out.to_str().unwrap(),
        "--add",
        add,
    ];
    let result = husk_rootfs(&args);
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("/nonexistent/tree"),
        "{}",
        stderr(&result)
    );
}
