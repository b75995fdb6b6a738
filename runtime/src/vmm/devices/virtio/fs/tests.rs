//! Unit tests that need no real virtiofsd: tags, process start failures and cleanup, and
//! vhost-user backends that misbehave. The tests with virtiofsd are in
//! `tests/tests/virtiofs_host.rs`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::device::{validate_tag, FsError, VirtioFs};
use super::virtiofsd::{pid_file, Virtiofsd, VirtiofsdConfig, VirtiofsdError};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn config(dir: &Path, binary: PathBuf) -> VirtiofsdConfig {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    VirtiofsdConfig::new(binary, share, dir.join("fs.sock"))
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose; reaped ones have no /proc entry at all.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn tags_must_fit_the_config_space() {
    assert!(validate_tag("rootfs").is_ok());
    assert!(validate_tag(&"x".repeat(36)).is_ok());
    for (tag, why) in [
        ("", "empty"),
        (&*"x".repeat(37), "longer than 36"),
        ("a\0b", "NUL"),
    ] {
        let err = validate_tag(tag).unwrap_err().to_string();
        assert!(
            err.contains(why) && err.contains("mount -t virtiofs"),
            "{err}"
        );
    }
}

#[test]
fn missing_share_dir_and_binary_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), PathBuf::from("/bin/true"));
    cfg.share_dir = dir.path().join("no-such-share");
    let err = Virtiofsd::start(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("no-such-share") && err.contains("does not exist"),
        "{err}"
    );

    let cfg = config(dir.path(), dir.path().join("no-virtiofsd"));
    let err = Virtiofsd::start(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("no-virtiofsd") && err.contains("HUSK_VIRTIOFSD") && err.contains("setup.sh"),
        "{err}"
    );
}

#[test]
fn virtiofsd_that_exits_at_once_is_reported_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let bin = script(
        dir.path(),
        "vfsd",
        "echo 'fatal: cannot open shared dir' >&2; exit 3",
    );
    let err = Virtiofsd::start(&config(dir.path(), bin)).unwrap_err();
    assert!(matches!(err, VirtiofsdError::ExitedEarly { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("exit status: 3") && msg.contains("fatal: cannot open shared dir"),
        "{msg}"
    );
}

#[test]
fn virtiofsd_that_never_listens_times_out_and_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_path = dir.path().join("pid");
    let bin = script(
        dir.path(),
        "vfsd",
        &format!(
            "echo $$ > {}; echo starting >&2; exec sleep 60",
            pid_path.display()
        ),
    );
    let mut cfg = config(dir.path(), bin);
    cfg.start_timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let err = Virtiofsd::start(&cfg).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("did not listen") && msg.contains("fs.sock") && msg.contains("starting"),
        "{msg}"
    );
    let pid: u32 = std::fs::read_to_string(&pid_path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "the fake virtiofsd {pid} is still running");
}

#[test]
fn drop_kills_the_process_group_and_removes_socket_and_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let pid_path = dir.path().join("pids");
    let sock = dir.path().join("fs.sock");
    // Listens like virtiofsd (via a forked helper, like its sandboxed worker), then waits.
    let bin = script(
        dir.path(),
        "vfsd",
        &format!(
            "sleep 60 & echo $! > {pids}; touch {pidf}; \
             exec python3 -c 'import socket,time; s=socket.socket(socket.AF_UNIX); s.bind(\"{sock}\"); s.listen(1); time.sleep(60)'",
            pids = pid_path.display(),
            pidf = pid_file(&sock).display(),
            sock = sock.display()
        ),
    );
    let (daemon, _stream) = Virtiofsd::start(&config(dir.path(), bin)).unwrap();
    let main_pid = daemon.pid();
    let helper: u32 = std::fs::read_to_string(&pid_path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(main_pid) && alive(helper));
    drop(daemon);
    assert!(!alive(main_pid), "virtiofsd {main_pid} survived drop");
    let deadline = Instant::now() + Duration::from_secs(2);
    // The helper is an orphan reaped by init: give init a moment.
    while alive(helper) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(helper), "virtiofsd's child {helper} survived drop");
    assert!(!sock.exists() && !pid_file(&sock).exists());
}

#[test]
fn backend_that_never_answers_fails_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    let (_held, _) = listener.accept().unwrap();
    let t0 = Instant::now();
    let err = VirtioFs::with_backend("rootfs", stream, &path, None, Duration::from_millis(200))
        .err()
        .expect("a mute backend must fail");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("did not answer GET_FEATURES") && msg.contains("mute.sock"),
        "{msg}"
    );
}

#[test]
fn backend_that_hangs_up_is_a_request_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    drop(listener.accept().unwrap());
    let err = VirtioFs::with_backend("rootfs", stream, &path, None, Duration::from_secs(5))
        .err()
        .expect("a closed backend must fail");
    assert!(matches!(err, FsError::Frontend(_)), "{err:?}");
    assert!(err.to_string().contains("gone.sock"), "{err}");
}
