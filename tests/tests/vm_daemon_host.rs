//! Tier 2: the `--isolation vm` backend (the `husk vmm` daemon, its control socket,
//! stdio relays, exec helpers, the share bind mount) driven through the `husk` CLI, with
//! the test-only guest `HUSK_TEST_GUEST=host-agent`: `husk-agent --unix-dir` on the host
//! instead of a microVM, so the whole lifecycle runs in seconds.
//!
//! Needs root and the built binaries (`cargo build -p husk -p husk-agent -p husk-rootfs`).
//! The test process is a child subreaper, as containerd's shim is: an orphaned daemon is
//! reparented to it, so its exit status (the container's) can be read with waitpid.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// A `--root` of its own, force-deleting its containers when dropped.
struct Husk {
    root: tempfile::TempDir,
    ids: Vec<String>,
}

/// What a command did (stdio through files: a container that inherits them cannot keep
/// the test waiting for end of file).
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Husk {
    fn new() -> Husk {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            uid, 0,
            "vm_daemon_host needs root (mounts, namespaces, cgroups)"
        );
        for bin in ["husk", "husk-agent", "husk-rootfs"] {
            assert!(
                target_dir().join(bin).exists(),
                "build first: cargo build -p husk -p husk-agent -p husk-rootfs"
            );
        }
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        Husk {
            root: tempfile::tempdir().unwrap(),
            ids: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(target_dir().join("husk"));
        c.arg("--root")
            .arg(self.root.path())
            .args(["--isolation", "vm"])
            .args(args)
            .env("HUSK_TEST_GUEST", "host-agent")
            .env("HUSK_AGENT", target_dir().join("husk-agent"))
            .stdin(Stdio::null());
        c
    }

    /// Runs `husk ARGS` with `stdin` fed in, killing it after 30 s.
    fn run_in(&mut self, args: &[&str], stdin: Option<&str>) -> Out {
        if let Some(id) = args.last() {
            if !self.ids.iter().any(|i| i == id) && !id.starts_with('-') {
                self.ids.push(id.to_string());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let mut cmd = self.command(args);
        cmd.stdout(File::create(&o).unwrap())
            .stderr(File::create(&e).unwrap());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).unwrap();
        }
        let start = Instant::now();
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Out {
            code,
            stdout: std::fs::read_to_string(o).unwrap_or_default(),
            stderr: std::fs::read_to_string(e).unwrap_or_default(),
        }
    }

    fn run(&mut self, args: &[&str]) -> Out {
        self.run_in(args, None)
    }

    fn must(&mut self, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(out.code, Some(0), "husk {}: {out:?}", args.join(" "));
        out
    }

    fn state(&mut self, id: &str) -> Value {
        serde_json::from_str(&self.must(&["state", id]).stdout).unwrap()
    }

    fn wait_status(&mut self, id: &str, want: &str) {
        let start = Instant::now();
        loop {
            let st = self.state(id);
            if st["status"] == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id}: {st}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nothing of the sandbox is left: no state dir, mount or process under the root.
    fn assert_nothing_left(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left under --root: {left:?}");
        let root = self.root.path().to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&root), "mounts left under {root}");
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(&root),
                "process left: {} {cmdline}",
                p.file_name().to_string_lossy()
            );
        }
    }
}

impl Drop for Husk {
    fn drop(&mut self) {
        for id in self.ids.clone() {
            let _ = self
                .command(&["delete", "--force", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A busybox bundle running `sh -c SCRIPT`, writable root.
fn bundle(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new(target_dir().join("husk-rootfs"))
        .args(["bundle", "--force", "--out"])
        .arg(dir.path())
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "husk-rootfs bundle failed");
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["root"]["readonly"] = Value::Bool(false);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir
}

/// Waits (as subreaper) for `pid` and returns its exit code, shell convention.
fn reap(pid: i32) -> i32 {
    let start = Instant::now();
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::Exited(_, code) => return code,
            WaitStatus::Signaled(_, sig, _) => return 128 + sig as i32,
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pid {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cmdline(pid: i64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

#[test]
fn create_start_exit_code_stdio_and_share() {
    let mut h = Husk::new();
    // The container waits for a file the test makes through the bundle's rootfs: that
    // it sees it proves the share is the bundle's rootfs, bound in place.
    let b = bundle("echo out; echo err >&2; while [ ! -e /go ]; do sleep 0.05; done; exit 7");
    let pid_file = b.path().join("pid");
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let status = h
        .command(&[
            "create",
            "--bundle",
            b.path().to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ])
        .stdout(File::create(&o).unwrap())
        .stderr(File::create(&e).unwrap())
        .status()
        .unwrap();
    h.ids.push("c1".into());
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&e).unwrap()
    );
    let st = h.state("c1");
    assert_eq!(st["status"], "created", "{st}");
    let pid = st["pid"].as_i64().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert!(
        cmdline(pid).contains("vmm daemon"),
        "pid {pid} is not the daemon: {}",
        cmdline(pid)
    );
    let mount = h.root.path().join("c1/share/c1/rootfs");
    assert!(
        mount.join("bin/busybox").exists(),
        "rootfs not bound at {mount:?}"
    );
    assert!(std::fs::read(&o).unwrap().is_empty(), "ran before start");
    h.must(&["start", "c1"]);
    h.wait_status("c1", "running");
    assert!(
        !h.run(&["start", "c1"]).stderr.is_empty(),
        "second start must fail"
    );
    let out = h.run(&["delete", "c1"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("--force"),
        "delete of running: {out:?}"
    );
    std::fs::write(b.path().join("rootfs/go"), "").unwrap();
    assert_eq!(
        reap(pid as i32),
        7,
        "the daemon exits with the container's code"
    );
    assert_eq!(std::fs::read_to_string(&o).unwrap(), "out\n");
    assert_eq!(std::fs::read_to_string(&e).unwrap(), "err\n");
    let st = h.state("c1");
    assert!(st["status"] == "stopped" && st["pid"] == 0, "{st}");
    h.must(&["delete", "c1"]);
    assert!(h.run(&["state", "c1"]).code != Some(0));
    assert!(
        b.path().join("rootfs/bin/busybox").exists(),
        "delete must not touch the bundle"
    );
    h.assert_nothing_left();
}

#[test]
fn run_relays_stdin_and_propagates_the_exit_code() {
    let mut h = Husk::new();
    let b = bundle("read x; echo got:$x; echo oops >&2; exit 3");
    let out = h.run_in(
        &["run", "--bundle", b.path().to_str().unwrap(), "r1"],
        Some("hello\n"),
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "got:hello\n", "{out:?}");
    assert_eq!(out.stderr, "oops\n", "{out:?}");
    assert!(
        h.run(&["state", "r1"]).code != Some(0),
        "run must delete the container"
    );
    h.assert_nothing_left();
}

#[test]
fn exec_kill_and_dead_daemon() {
    let mut h = Husk::new();
    let b = bundle("sleep 100");
    let bp = b.path().to_str().unwrap().to_string();
    h.must(&["create", "--bundle", &bp, "e1"]);
    assert!(
        h.run(&["exec", "e1", "true"]).stderr.contains("created"),
        "exec before start must fail"
    );
    h.must(&["start", "e1"]);
    h.wait_status("e1", "running");
    let out = h.run(&[
        "exec",
        "--env",
        "X=1",
        "--cwd",
        "/tmp",
        "e1",
        "sh",
        "-c",
        "echo $X $(pwd); exit 5",
    ]);
    assert!(out.code == Some(5) && out.stdout == "1 /tmp\n", "{out:?}");
    // Docker's form: process.json, detached, pid file; the pid is the exec relay's.
    let process = b.path().join("p.json");
    std::fs::write(&process, r#"{"cwd":"/","args":["sh","-c","echo hi > /marker; sleep 100"],"env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#).unwrap();
    let epid = b.path().join("epid");
    h.must(&[
        "exec",
        "--process",
        process.to_str().unwrap(),
        "--detach",
        "--pid-file",
        epid.to_str().unwrap(),
        "e1",
    ]);
    let exec_pid: i64 = std::fs::read_to_string(&epid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        cmdline(exec_pid).contains("exec-relay"),
        "{}",
        cmdline(exec_pid)
    );
    let start = Instant::now();
    while !b.path().join("rootfs/marker").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "detached exec did not run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = h.state("e1")["pid"].as_i64().unwrap();
    h.must(&["kill", "e1", "KILL"]);
    assert_eq!(reap(pid as i32), 137);
    // The exec relay ends with its process (killed with the container).
    reap(exec_pid as i32);
    h.wait_status("e1", "stopped");
    let out = h.run(&["exec", "e1", "true"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("stopped"),
        "{out:?}"
    );
    assert!(
        h.run(&["kill", "e1", "KILL"]).code != Some(0),
        "kill of a stopped container must fail"
    );
    h.must(&["delete", "e1"]);

    // A daemon killed from outside: the container reads as stopped, delete cleans up
    // (the share mount and the orphaned guest included).
    h.must(&["create", "--bundle", &bp, "e2"]);
    h.must(&["start", "e2"]);
    let pid = h.state("e2")["pid"].as_i64().unwrap();
    nix::sys::signal::kill(Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).unwrap();
    reap(pid as i32);
    let st = h.state("e2");
    assert!(st["status"] == "stopped" && st["pid"] == 0, "{st}");
    h.must(&["delete", "e2"]);
    std::fs::remove_file(b.path().join("rootfs/marker")).unwrap();
    h.assert_nothing_left();
}

#[test]
fn bad_input_leaves_nothing() {
    let mut h = Husk::new();
    let b = bundle("true");
    std::fs::rename(b.path().join("rootfs"), b.path().join("elsewhere")).unwrap();
    let out = h.run(&["create", "--bundle", b.path().to_str().unwrap(), "bad"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("rootfs"),
        "{out:?}"
    );
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(b.path().join("config.json")).unwrap()).unwrap();
    std::fs::rename(b.path().join("elsewhere"), b.path().join("rootfs")).unwrap();
    config["process"]["terminal"] = Value::Bool(true);
    std::fs::write(b.path().join("config.json"), config.to_string()).unwrap();
    let out = h.run(&["create", "--bundle", b.path().to_str().unwrap(), "bad"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("--console-socket"),
        "{out:?}"
    );
    h.assert_nothing_left();
}
