//! The `husk` command line as the tests drive it: a private `--root`, commands with
//! timeouts and stdio through files, OCI state polling, and the checks that nothing of a
//! sandbox is left behind.
//!
//! The test process becomes a child subreaper, as containerd's shim is: a daemon that
//! `create` leaves behind is reparented to it, so its exit status (the container's) can be
//! read with waitpid, as Docker and the shim do.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

/// Where cargo put the workspace's debug binaries.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// Which guest the `--isolation vm` sandboxes get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// A real microVM: the guest kernel, the agent as PID 1, virtio-fs. Needs /dev/kvm
    /// and `scripts/setup.sh`; take `husk_tests::vm_lock` around it.
    MicroVm,
    /// The test-only guest `HUSK_TEST_GUEST=host-agent`: `husk-agent --unix-dir` on the
    /// host instead of a VM, so the daemon's whole lifecycle runs in seconds.
    HostAgent,
}

/// A `--root` of its own, force-deleting its containers when dropped.
pub struct Husk {
    root: tempfile::TempDir,
    ids: Vec<String>,
    guest: Guest,
    global_args: Vec<String>,
}

/// What a command did (stdio through files: a daemon that inherits them cannot keep the
/// test waiting for end of file).
#[derive(Debug)]
pub struct Out {
    /// None: killed at the timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Husk {
    /// Needs root (mounts, namespaces, cgroups) and the built binaries.
    pub fn new(guest: Guest) -> Husk {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(uid, 0, "the husk CLI tests need root (mounts, namespaces)");
        let bins: &[&str] = match guest {
            Guest::MicroVm => {
                crate::vmm::require_kvm();
                &["husk", "husk-rootfs"]
            }
            Guest::HostAgent => &["husk", "husk-agent", "husk-rootfs"],
        };
        for bin in bins {
            assert!(
                target_dir().join(bin).exists(),
                "{bin} is not built: run scripts/setup.sh (or cargo build --workspace)"
            );
        }
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        Husk {
            root: tempfile::tempdir().unwrap(),
            ids: Vec::new(),
            guest,
            global_args: Vec::new(),
        }
    }

    /// Global flags put before every subcommand (e.g. `--seccomp log`).
    pub fn with_global_args(mut self, args: &[&str]) -> Husk {
        self.global_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// The `--root` directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `husk --root R --isolation vm [global args] ARGS`, stdin from /dev/null.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(target_dir().join("husk"));
        c.arg("--root")
            .arg(self.root.path())
            .args(["--isolation", "vm"])
            .args(&self.global_args)
            .args(args)
            .stdin(Stdio::null());
        match self.guest {
            Guest::MicroVm => {
                c.env_remove("HUSK_TEST_GUEST");
            }
            Guest::HostAgent => {
                c.env("HUSK_TEST_GUEST", "host-agent")
                    .env("HUSK_AGENT", target_dir().join("husk-agent"));
            }
        }
        c
    }

    /// Remembers the container id (the last argument) for the cleanup on drop.
    pub fn track(&mut self, args: &[&str]) {
        if let Some(id) = args.last() {
            if !id.starts_with('-') && !self.ids.iter().any(|i| i == id) {
                self.ids.push(id.to_string());
            }
        }
    }

    /// Runs `husk ARGS`, killing it after `timeout`.
    pub fn run_for(&mut self, args: &[&str], timeout: Duration) -> Out {
        self.run_with_stdin(args, None, timeout)
    }

    /// Runs `husk ARGS` with `stdin` written to it (then closed), killing it after
    /// `timeout`.
    pub fn run_with_stdin(&mut self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Out {
        self.track(args);
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
        let code = wait_child(&mut child, timeout);
        Out {
            code,
            stdout: std::fs::read_to_string(o).unwrap_or_default(),
            stderr: std::fs::read_to_string(e).unwrap_or_default(),
        }
    }

    /// `husk exec ARGS`.
    pub fn exec_for(&mut self, args: &[&str], timeout: Duration) -> Out {
        let mut full = vec!["exec"];
        full.extend_from_slice(args);
        self.run_for(&full, timeout)
    }

    /// [`Self::run_for`] that must exit 0.
    pub fn must(&mut self, args: &[&str], timeout: Duration) -> Out {
        let out = self.run_for(args, timeout);
        assert_eq!(out.code, Some(0), "husk {}: {out:?}", args.join(" "));
        out
    }

    /// `husk state ID` as JSON.
    pub fn state(&mut self, id: &str, timeout: Duration) -> Value {
        let out = self.must(&["state", id], timeout);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("state: {e}: {out:?}"))
    }

    /// Polls `husk state ID` until its status is `want`.
    pub fn wait_status(&mut self, id: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let st = self.state(id, timeout);
            if st["status"] == want {
                return;
            }
            assert!(start.elapsed() < timeout, "{id}: {st}, want {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nothing of the sandbox is left: no state dir, mount or process under the root.
    /// Guest templates are a cache of the root, not a sandbox's state, and may stay.
    pub fn assert_nothing_left(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != husk::sandbox::vm::TEMPLATES_DIR)
            .collect();
        assert!(left.is_empty(), "left under --root: {left:?}");
        let root = self.root.path().to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&root), "mounts left under {root}");
        // Helpers (a detached exec's relay) end when the guest's streams close: give
        // them a moment, no more.
        let start = Instant::now();
        loop {
            reap_orphans();
            let left = processes_naming(&root);
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "processes left: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
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
        reap_orphans();
    }
}

/// "PID cmdline" of the processes whose command line contains `text`.
pub fn processes_naming(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(text) {
            out.push(format!("{} {cmdline}", p.file_name().to_string_lossy()));
        }
    }
    out
}

/// Waits for `child` up to `timeout` (killing it then); its exit code.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Exit codes of the orphans [`reap_orphans`] reaped, by pid: another test thread's sweep
/// may reap a daemon or relay that a test is about to [`reap`] itself.
static SWEPT: std::sync::Mutex<Vec<(i32, i32)>> = std::sync::Mutex::new(Vec::new());

fn swept(pid: i32) -> Option<i32> {
    let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
    let at = swept.iter().position(|(p, _)| *p == pid)?;
    Some(swept.remove(at).1)
}

/// The exit code of a wait status, shell convention; None while it runs.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Waits (as subreaper) for `pid`; its exit code, shell convention.
pub fn reap(pid: i32, timeout: Duration) -> i32 {
    let start = Instant::now();
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return code;
                }
            }
            Err(nix::Error::ECHILD) => {
                if let Some(code) = swept(pid) {
                    return code;
                }
                panic!("pid {pid} is not a child of the test process (ECHILD)");
            }
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
        assert!(start.elapsed() < timeout, "pid {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps the husk daemons and exec relays that exited after being reparented to this
/// subreaper, and nothing else: `waitpid(-1)` would also take the direct children of
/// tests running in parallel threads, whose own waits would then fail with ECHILD. Their
/// exit codes are kept for a test that [`reap`]s one of them itself.
pub fn reap_orphans() {
    let me = std::process::id();
    let orphan_names = [
        husk::daemon::DAEMON_PROCESS_NAME,
        husk::daemon::EXEC_RELAY_PROCESS_NAME,
    ];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z") && ppid == Some(me) && orphan_names.contains(&comm) {
            let status = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            if let Some(code) = status.ok().and_then(exit_code) {
                let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
                swept.push((pid, code));
            }
        }
    }
}

/// A busybox bundle (read-only root, as `husk-rootfs bundle` makes it) running
/// `sh -c SCRIPT`.
pub fn bundle(script: &str) -> tempfile::TempDir {
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
    dir
}

/// [`bundle`] with a writable root.
pub fn writable_bundle(script: &str) -> tempfile::TempDir {
    let dir = bundle(script);
    edit_config(dir.path(), |config| {
        config["root"]["readonly"] = Value::Bool(false)
    });
    dir
}

/// Rewrites the bundle's config.json through `edit`.
pub fn edit_config(bundle: &Path, edit: impl FnOnce(&mut Value)) {
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// `Vec<String>` arguments as `husk` takes them.
pub fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A process's command line, arguments joined by spaces ("" once it is gone).
pub fn cmdline(pid: i64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}
