//! `husk-rootfs root-disk`, checked without mounting the image, with e2fsprogs'
//! `dumpe2fs`, `debugfs` and `e2fsck`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{husk_rootfs, husk_rootfs_ok, require_root, stderr, STATIC_BINARY};

const WHY_ROOT: &str = "root-disk stages /dev/console with mknod";

fn build(dir: &Path, name: &str, agent: &Path, adds: &[String]) -> PathBuf {
    require_root(WHY_ROOT);
    let out = dir.join(name);
    husk_rootfs_ok(&args(agent, &out, adds));
    out
}

fn args<'a>(agent: &'a Path, out: &'a Path, adds: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![
        "root-disk",
        "--agent",
        agent.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for add in adds {
        args.extend(["--add", add.as_str()]);
    }
    args
}

/// Runs an e2fsprogs tool (from /usr/sbin when PATH lacks it) and returns its stdout.
fn e2fs(tool: &str, args: &[&str]) -> String {
    let sbin = Path::new("/usr/sbin").join(tool);
    let program = if sbin.exists() {
        sbin
    } else {
        PathBuf::from(tool)
    };
    let out = Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e} (apt-get install e2fsprogs)"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn debugfs(image: &Path, request: &str) -> String {
    e2fs("debugfs", &["-R", request, image.to_str().unwrap()])
}

/// `debugfs ls -l` of a directory: name -> octal mode with the file-type bits.
fn listing(image: &Path, dir: &str) -> Vec<(String, String)> {
    debugfs(image, &format!("ls -l {dir}"))
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 9).then(|| (fields[8..].join(" "), fields[1].to_string()))
        })
        .collect()
}

fn mode_of(listing: &[(String, String)], name: &str) -> String {
    listing
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing from {listing:?}"))
        .1
        .clone()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn superblock_has_no_journal_no_checksums_and_the_label() {
    let dir = tempfile::tempdir().unwrap();
    let image = build(dir.path(), "root.img", Path::new(STATIC_BINARY), &[]);
    let header = e2fs("dumpe2fs", &["-h", image.to_str().unwrap()]);
    let features = header
        .lines()
        .find(|line| line.starts_with("Filesystem features:"))
        .expect("features line");
    for off in [
        "has_journal",
        "metadata_csum",
        "resize_inode",
        "orphan_file",
    ] {
        assert!(!features.contains(off), "{off} is on: {features}");
    }
    assert!(features.contains("extent"), "{features}");
    let label = header
        .lines()
        .find(|line| line.starts_with("Filesystem volume name:"))
        .expect("label line");
    assert!(label.ends_with(" husk-root"), "{label}");
    // A consistent filesystem, as the guest kernel will find it.
    e2fs("e2fsck", &["-f", "-n", image.to_str().unwrap()]);
    assert_eq!(
        fs::metadata(&image).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

#[test]
fn init_is_the_agent_byte_for_byte_with_mode_0755() {
    let dir = tempfile::tempdir().unwrap();
    let image = build(dir.path(), "root.img", Path::new(STATIC_BINARY), &[]);
    let dumped = dir.path().join("init");
    debugfs(&image, &format!("dump /init {}", dumped.display()));
    assert!(
        fs::read(&dumped).unwrap() == fs::read(STATIC_BINARY).unwrap(),
        "/init differs from the agent"
    );
    let stat = debugfs(&image, "stat /init");
    assert!(stat.contains("Type: regular"), "{stat}");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
}

#[test]
fn the_agent_dirs_exist_tmp_is_sticky_and_the_console_is_5_1() {
    let dir = tempfile::tempdir().unwrap();
    let image = build(dir.path(), "root.img", Path::new(STATIC_BINARY), &[]);
    let root = listing(&image, "/");
    assert_eq!(mode_of(&root, "."), "40755", "the root directory");
    for name in ["proc", "sys", "dev", "run", "etc", "mnt"] {
        assert_eq!(mode_of(&root, name), "40755", "/{name}");
    }
    assert_eq!(mode_of(&root, "tmp"), "41777", "/tmp");
    assert_eq!(mode_of(&root, "init"), "100755", "/init");
    let console = debugfs(&image, "stat /dev/console");
    assert!(console.contains("Type: character special"), "{console}");
    assert!(console.contains("Mode:  0600"), "{console}");
    assert!(
        console.contains("Device major/minor number: 05:01"),
        "{console}"
    );
}

#[test]
fn added_files_symlinks_and_modes_show_up() {
    let dir = tempfile::tempdir().unwrap();
    let adds = common::sample_adds(dir.path());
    let image = build(dir.path(), "root.img", Path::new(STATIC_BINARY), &adds);

    assert_eq!(debugfs(&image, "cat /opt/data/file.txt"), "hello");
    assert_eq!(debugfs(&image, "cat /etc/single"), "one file");
    let data = listing(&image, "/opt/data");
    assert_eq!(mode_of(&data, "file.txt"), "100640");
    assert_eq!(mode_of(&data, "relative-link"), "120777");
    assert_eq!(mode_of(&listing(&image, "/opt/data/sub"), "tool"), "100700");
    let link = debugfs(&image, "stat /opt/data/relative-link");
    assert!(link.contains("Fast link dest: \"file.txt\""), "{link}");
    assert_eq!(
        mode_of(&listing(&image, "/"), "init"),
        "100755",
        "the agent is still /init"
    );
}

#[test]
fn a_large_add_tree_fits() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // Many small files in one directory (a hashed directory index) and a large file
    // with holes (many extents).
    fs::create_dir_all(src.join("many")).unwrap();
    for i in 0..3000 {
        fs::write(
            src.join(format!("many/file-with-a-longish-name-{i:05}")),
            "x",
        )
        .unwrap();
    }
    let mut big = vec![0u8; 24 << 20];
    for chunk in big.chunks_mut(8192) {
        chunk[..4096].fill(0xa5);
    }
    fs::write(src.join("big"), &big).unwrap();
    let adds = [format!("{}:/data", src.display())];
    let image = build(dir.path(), "root.img", Path::new(STATIC_BINARY), &adds);
    e2fs("e2fsck", &["-f", "-n", image.to_str().unwrap()]);
    let dumped = dir.path().join("big.out");
    debugfs(&image, &format!("dump /data/big {}", dumped.display()));
    assert!(fs::read(&dumped).unwrap() == big, "/data/big differs");
    assert_eq!(
        debugfs(&image, "cat /data/many/file-with-a-longish-name-02999"),
        "x"
    );
}

#[test]
fn same_inputs_give_identical_bytes_whatever_the_file_times() {
    common::assert_reproducible("img", build);
}

#[test]
fn a_non_static_agent_is_refused_as_for_the_initramfs() {
    let dir = tempfile::tempdir().unwrap();
    // Debian's coreutils are dynamically linked.
    let dynamic = Path::new("/bin/ls");
    let out = dir.path().join("root.img");
    let disk = husk_rootfs(&args(dynamic, &out, &[]));
    assert!(!disk.status.success());
    let cpio_out = dir.path().join("initramfs.cpio");
    let cpio = husk_rootfs(&[
        "initramfs",
        "--agent",
        dynamic.to_str().unwrap(),
        "--out",
        cpio_out.to_str().unwrap(),
    ]);
    assert!(!cpio.status.success());
    assert_eq!(stderr(&disk), stderr(&cpio));
    assert!(stderr(&disk).contains("crt-static"), "{}", stderr(&disk));
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[test]
fn a_failed_build_leaves_nothing_behind() {
    require_root(WHY_ROOT);
    let dir = tempfile::tempdir().unwrap();

    // The output's directory does not exist.
    let out = dir.path().join("missing/root.img");
    let result = husk_rootfs(&args(Path::new(STATIC_BINARY), &out, &[]));
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains(&dir.path().join("missing").display().to_string()),
        "{}",
        stderr(&result)
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );

    // An --add source that does not exist.
    let out = dir.path().join("root.img");
    let adds = ["/nonexistent/tree:/data".to_string()];
    let result = husk_rootfs(&args(Path::new(STATIC_BINARY), &out, &adds));
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("/nonexistent/tree"),
        "{}",
        stderr(&result)
    );

    // An --add that conflicts with the agent's directories (a file at /tmp).
    let file = dir.path().join("file");
    fs::write(&file, "not a directory").unwrap();
    let adds = [format!("{}:/tmp", file.display())];
    let result = husk_rootfs(&args(Path::new(STATIC_BINARY), &out, &adds));
    assert!(!result.status.success());
    assert_eq!(files_in(dir.path()), ["file"]);
}

#[test]
fn mke2fs_failing_reports_its_stderr_and_leaves_nothing() {
    require_root(WHY_ROOT);
    let dir = tempfile::tempdir().unwrap();
    // A stand-in mke2fs that fails the way a real one would, found first on PATH.
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join("mke2fs");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'mke2fs: Could not allocate block' >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("root.img");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let result = Command::new(env!("CARGO_BIN_EXE_husk-rootfs"))
        .args(args(Path::new(STATIC_BINARY), &out, &[]))
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("Could not allocate block"),
        "{}",
        stderr(&result)
    );
    assert!(files_in(&out_dir).is_empty(), "{:?}", files_in(&out_dir));
}
