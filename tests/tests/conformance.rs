//! A runc-style conformance suite (in the spirit of runtime-tools' validation and youki's
//! contest), run against `husk --isolation container` and, where installed, against runc
//! as a reference, so that the suite itself is checked. Each case builds its own bundle
//! with `husk-rootfs bundle` into a tempdir and uses its own `--root`.
//!
//! Every case also runs against `husk --isolation vm`: each of its `run`s
//! and `create`s boots a real microVM (~45-60 s here), under `/tmp/husk-vm.lock`
//! (`husk_tests::vm_lock`). `HUSK_CONFORMANCE_VM=0` leaves it out, and the summary says so.
//!
//! Needs root and the built binaries: `cargo build -p husk -p husk-rootfs`; for the vm
//! run also /dev/kvm and `scripts/setup.sh` (guest kernel, initramfs, virtiofsd).
//! Prints `conformance: husk-container N passed, N failed; husk-vm N passed, N failed;
//! runc N passed, N failed` and fails if any husk case fails.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type CaseResult = Result<(), String>;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// One runtime under test: a binary and its global flags.
struct Runtime {
    name: &'static str,
    bin: PathBuf,
    global: Vec<String>,
    root: tempfile::TempDir,
    /// Error messages must name the thing at fault (husk's promise; runc's say less).
    strict_messages: bool,
    /// One command, and one status change: a VM boot takes most of a minute here.
    timeout: Duration,
    settle: Duration,
    /// The container's processes live in a guest: their pids are not host pids, and the
    /// state's pid is the vmm daemon's.
    vm: bool,
}

/// What a command did; stdout/stderr go through files, so a container that inherits
/// them cannot keep the test waiting for EOF.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}, stdout {:?}, stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Runtime {
    fn new(name: &'static str, bin: PathBuf, extra: &[&str], strict_messages: bool) -> Runtime {
        let root = tempfile::tempdir().unwrap();
        let mut global = vec!["--root".to_string(), root.path().display().to_string()];
        global.extend(extra.iter().map(|s| s.to_string()));
        Runtime {
            name,
            bin,
            global,
            root,
            strict_messages,
            timeout: Duration::from_secs(30),
            settle: Duration::from_secs(10),
            vm: false,
        }
    }

    /// Room for a guest boot per command, on a machine shared with builds.
    fn with_vm_timeouts(mut self) -> Runtime {
        self.timeout = Duration::from_secs(400);
        self.settle = Duration::from_secs(120);
        self.vm = true;
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(&self.global).args(args).stdin(Stdio::null());
        c
    }

    /// Runs the runtime with `args`, killing it after `timeout`.
    fn run_with(&self, args: &[&str], timeout: Duration) -> Out {
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let mut child = self
            .command(args)
            .stdout(File::create(&o).unwrap())
            .stderr(File::create(&e).unwrap())
            .spawn()
            .unwrap();
        let code = husk_tests::cli::wait_child(&mut child, timeout);
        Out {
            code,
            stdout: std::fs::read_to_string(o).unwrap_or_default(),
            stderr: std::fs::read_to_string(e).unwrap_or_default(),
        }
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, self.timeout)
    }

    fn must(&self, args: &[&str]) -> Result<Out, String> {
        let out = self.run(args);
        check!(out.ok(), "`{} {}`: {out}", self.name, args.join(" "));
        Ok(out)
    }

    fn state(&self, id: &str) -> Result<Value, String> {
        let out = self.must(&["state", id])?;
        serde_json::from_str(&out.stdout).map_err(|e| format!("state is not JSON ({e}): {out}"))
    }

    fn status(&self, id: &str) -> Result<String, String> {
        Ok(self.state(id)?["status"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Polls until `id` has `want` status.
    fn wait_status(&self, id: &str, want: &str) -> CaseResult {
        let start = Instant::now();
        loop {
            let status = self.status(id)?;
            if status == want {
                return Ok(());
            }
            check!(
                start.elapsed() < self.settle,
                "{id}: status {status}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `run` of a bundle: the container's exit code and output.
    fn run_bundle(&self, bundle: &Bundle, id: &str) -> Out {
        self.run(&["run", "--bundle", bundle.path(), id])
    }

    /// Leaves nothing behind, whatever the case did.
    fn cleanup(&self, id: &str) {
        let _ = self.run(&["delete", "--force", id]);
    }
}

/// A bundle in a tempdir.
struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

/// Makes a busybox bundle running `args`, then lets `edit` change config.json.
fn bundle(args: &[&str], edit: impl FnOnce(&mut Value)) -> Bundle {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(target_dir().join("husk-rootfs"))
        .args(["bundle", "--force", "--out"])
        .arg(dir.path())
        .arg("--")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "husk-rootfs bundle failed");
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    Bundle { dir }
}

fn sh(script: &str) -> Bundle {
    bundle(&["sh", "-c", script], |_| {})
}

fn sh_with(script: &str, edit: impl FnOnce(&mut Value)) -> Bundle {
    bundle(&["sh", "-c", script], edit)
}

fn writable(c: &mut Value) {
    c["root"]["readonly"] = json!(false);
}

// ---- cases ----

fn lifecycle(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100");
    let pid_file = b.dir.path().join("pid");
    rt.must(&[
        "create",
        "--bundle",
        b.path(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        "lc",
    ])?;
    let st = rt.state("lc")?;
    check!(st["status"] == "created", "after create: {st}");
    check!(
        st["id"] == "lc" && st["ociVersion"].is_string(),
        "state fields: {st}"
    );
    check!(
        st["bundle"] == b.path(),
        "bundle {} vs {}",
        st["bundle"],
        b.path()
    );
    let pid = st["pid"].as_i64().unwrap_or(0);
    check!(
        pid > 0 && Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} not alive"
    );
    let from_file = std::fs::read_to_string(&pid_file).map_err(|e| format!("pid file: {e}"))?;
    check!(
        from_file.trim() == pid.to_string(),
        "pid file {from_file:?} vs state {pid}"
    );
    // Waiting at the exec barrier: the user process is not running yet.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    check!(
        !String::from_utf8_lossy(&cmdline).contains("sleep"),
        "ran before start"
    );
    rt.must(&["start", "lc"])?;
    rt.wait_status("lc", "running")?;
    let out = rt.run(&["start", "lc"]);
    check!(!out.ok(), "second start succeeded: {out}");
    let out = rt.run(&["delete", "lc"]);
    check!(
        !out.ok(),
        "delete of a running container without --force succeeded: {out}"
    );
    rt.must(&["kill", "lc", "KILL"])?;
    rt.wait_status("lc", "stopped")?;
    rt.must(&["delete", "lc"])?;
    let out = rt.run(&["state", "lc"]);
    check!(!out.ok(), "state after delete: {out}");
    Ok(())
}

fn exit_code(rt: &Runtime) -> CaseResult {
    let out = rt.run_bundle(&sh("echo out; echo err >&2; exit 42"), "ec");
    check!(out.code == Some(42), "want exit 42: {out}");
    check!(
        out.stdout == "out\n" && out.stderr.contains("err"),
        "stdio not attached: {out}"
    );
    let out = rt.run(&["state", "ec"]);
    check!(!out.ok(), "run left the container behind: {out}");
    Ok(())
}

fn hostname(rt: &Runtime) -> CaseResult {
    let b = sh_with("hostname", |c| c["hostname"] = json!("conformance-host"));
    let out = rt.run_bundle(&b, "hn");
    check!(out.ok() && out.stdout.trim() == "conformance-host", "{out}");
    Ok(())
}

fn env(rt: &Runtime) -> CaseResult {
    let b = sh_with("echo $FOO-$PATH", |c| {
        c["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("FOO=bar"))
    });
    let out = rt.run_bundle(&b, "env");
    check!(
        out.ok() && out.stdout.starts_with("bar-/usr/local/sbin"),
        "{out}"
    );
    Ok(())
}

fn cwd(rt: &Runtime) -> CaseResult {
    let b = sh_with("pwd", |c| c["process"]["cwd"] = json!("/tmp"));
    let out = rt.run_bundle(&b, "cwd");
    check!(out.ok() && out.stdout.trim() == "/tmp", "{out}");
    Ok(())
}

fn user(rt: &Runtime) -> CaseResult {
    let b = sh_with("echo $(id -u):$(id -g):$(id -G)", |c| {
        c["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [1002]})
    });
    let out = rt.run_bundle(&b, "user");
    check!(out.ok(), "{out}");
    let got = out.stdout.trim();
    check!(
        got.starts_with("1000:1001:") && got.contains("1002"),
        "{out}"
    );
    Ok(())
}

fn rlimits(rt: &Runtime) -> CaseResult {
    let b = sh_with("ulimit -n; ulimit -Hn", |c| {
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}])
    });
    let out = rt.run_bundle(&b, "rl");
    check!(out.ok() && out.stdout == "321\n654\n", "{out}");
    Ok(())
}

fn readonly_root(rt: &Runtime) -> CaseResult {
    let out = rt.run_bundle(&sh("touch /x && echo wrote"), "ro");
    check!(
        !out.ok() && !out.stdout.contains("wrote"),
        "wrote to a read-only root: {out}"
    );
    let out = rt.run_bundle(&sh_with("touch /x && echo wrote", writable), "rw");
    check!(
        out.ok() && out.stdout.contains("wrote"),
        "writable root: {out}"
    );
    Ok(())
}

fn mounts(rt: &Runtime) -> CaseResult {
    let b = sh_with(
        "grep ' /mnt tmpfs ' /proc/mounts && echo hi > /mnt/f && cat /mnt/f",
        |c| {
            c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/mnt", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]
        }))
        },
    );
    let out = rt.run_bundle(&b, "mnt");
    check!(
        out.ok() && out.stdout.contains("nosuid") && out.stdout.ends_with("hi\n"),
        "{out}"
    );
    Ok(())
}

fn bind_mounts(rt: &Runtime) -> CaseResult {
    // Host directories bound into the container (`docker run -v`): read-write and
    // read-only; in a VM they travel through the sandbox's virtio-fs share.
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("in"), "from-host\n").unwrap();
    std::fs::write(ro.path().join("in"), "read-only\n").unwrap();
    let (rw_path, ro_path) = (rw.path().to_owned(), ro.path().to_owned());
    let b = sh_with(
        "cat /data/in /ro/in && echo from-container > /data/out && \
         (echo x > /ro/x 2>/dev/null && echo ro-writable || echo ro-refused)",
        |c| {
            let mounts = c["mounts"].as_array_mut().unwrap();
            mounts.push(json!({"destination": "/data", "type": "bind",
                "source": rw_path, "options": ["rbind", "rw"]}));
            mounts.push(json!({"destination": "/ro", "type": "bind",
                "source": ro_path, "options": ["rbind", "ro"]}));
        },
    );
    let out = rt.run_bundle(&b, "bm");
    check!(
        out.ok() && out.stdout == "from-host\nread-only\nro-refused\n",
        "{out}"
    );
    let written = std::fs::read_to_string(rw.path().join("out")).unwrap_or_default();
    check!(
        written == "from-container\n",
        "the container's write did not reach the host directory: {written:?}"
    );
    check!(
        !ro.path().join("x").exists(),
        "a write through the read-only bind reached the host"
    );
    Ok(())
}

fn masked_and_readonly_paths(rt: &Runtime) -> CaseResult {
    let b = sh_with(
        "test -s /proc/kcore && echo kcore-visible; ls /proc/acpi 2>/dev/null | wc -l; \
         grep ' /proc/sys ' /proc/mounts | cut -d' ' -f4",
        |c| {
            c["linux"]["maskedPaths"] = json!(["/proc/kcore", "/proc/acpi"]);
            c["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
        },
    );
    let out = rt.run_bundle(&b, "mask");
    check!(
        out.ok() && !out.stdout.contains("kcore-visible"),
        "kcore not masked: {out}"
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    check!(lines.first() == Some(&"0"), "/proc/acpi not masked: {out}");
    check!(
        lines
            .get(1)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "/proc/sys not ro: {out}"
    );
    Ok(())
}

fn seccomp(rt: &Runtime) -> CaseResult {
    let b = sh_with("mkdir /tmp/d 2>&1; echo rc=$?", |c| {
        writable(c);
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    let out = rt.run_bundle(&b, "sc");
    check!(
        out.stdout.contains("Operation not permitted") && out.stdout.contains("rc=1"),
        "{out}"
    );
    Ok(())
}

fn kill_signals(rt: &Runtime) -> CaseResult {
    // The script says when its trap is in place: before that a USR1 to PID 1 of the
    // container's namespace, which has no handler yet, is dropped (slow in a guest).
    let b = sh_with(
        "trap 'exit 7' USR1; touch /trapped; while true; do sleep 0.1; done",
        writable,
    );
    let trapped = b.dir.path().join("rootfs/trapped");
    for (id, sig) in [
        ("ks-name", "SIGUSR1"),
        ("ks-short", "USR1"),
        ("ks-num", "10"),
        ("ks-kill", "9"),
    ] {
        let _ = std::fs::remove_file(&trapped);
        rt.must(&["create", "--bundle", b.path(), id])?;
        rt.must(&["start", id])?;
        rt.wait_status(id, "running")?;
        let start = Instant::now();
        while !trapped.exists() {
            check!(start.elapsed() < rt.settle, "{id}: the trap was never set");
            std::thread::sleep(Duration::from_millis(20));
        }
        rt.must(&["kill", id, sig])?;
        rt.wait_status(id, "stopped")?;
        rt.must(&["delete", id])?;
    }
    let out = rt.run(&["kill", "nonexistent-id", "KILL"]);
    check!(!out.ok(), "kill of an unknown id succeeded: {out}");
    Ok(())
}

fn kill_all(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100 & sleep 100 & wait");
    rt.must(&["create", "--bundle", b.path(), "ka"])?;
    rt.must(&["start", "ka"])?;
    rt.wait_status("ka", "running")?;
    let ps = |rt: &Runtime| -> Result<Vec<i64>, String> {
        let ps = rt.must(&["ps", "--format", "json", "ka"])?;
        serde_json::from_str(&ps.stdout).map_err(|e| format!("ps json: {e}: {ps}"))
    };
    // The shell forks its two sleeps (seconds in a guest).
    let start = Instant::now();
    let pids = loop {
        let pids = ps(rt)?;
        if pids.len() >= 3 || start.elapsed() > rt.settle {
            break pids;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    check!(pids.len() >= 3, "ps shows {pids:?}");
    if rt.vm {
        // Guest pids: the host cannot look them up; the guest's ps must come back empty.
        rt.must(&["kill", "--all", "ka", "KILL"])?;
        rt.wait_status("ka", "stopped")?;
        let left = ps(rt)?;
        check!(left.is_empty(), "ps after kill --all: {left:?}");
        rt.must(&["delete", "ka"])?;
        return Ok(());
    }
    let pid = rt.state("ka")?["pid"].as_i64().unwrap();
    check!(pids.contains(&pid), "ps {pids:?} lacks init {pid}");
    rt.must(&["kill", "--all", "ka", "KILL"])?;
    rt.wait_status("ka", "stopped")?;
    for p in pids {
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        check!(
            state.is_empty() || state.contains(") Z"),
            "pid {p} survived kill --all"
        );
    }
    rt.must(&["delete", "ka"])?;
    Ok(())
}

fn exec(rt: &Runtime) -> CaseResult {
    let b = sh_with("sleep 100", writable);
    rt.must(&["create", "--bundle", b.path(), "ex"])?;
    rt.must(&["start", "ex"])?;
    rt.wait_status("ex", "running")?;
    let out = rt.run(&[
        "exec",
        "--env",
        "X=1",
        "--cwd",
        "/tmp",
        "ex",
        "sh",
        "-c",
        "echo $X $(pwd); exit 5",
    ]);
    check!(
        out.code == Some(5) && out.stdout == "1 /tmp\n",
        "exec: {out}"
    );
    let out = rt.run(&["exec", "--user", "1000:1000", "ex", "id", "-u"]);
    check!(
        out.ok() && out.stdout.trim() == "1000",
        "exec --user: {out}"
    );
    // A new process starts with no standard signal ignored or blocked (SIGPIPE is
    // ignored in every Rust program, the runtime's included): grep itself, as busybox
    // sh ignores SIGQUIT on its own.
    let out = rt.run(&[
        "exec",
        "ex",
        "grep",
        "-E",
        "^Sig(Ign|Blk)",
        "/proc/self/status",
    ]);
    check!(
        out.ok() && out.stdout.lines().count() == 2,
        "exec grep Sig: {out}"
    );
    for line in out.stdout.lines() {
        let mask = line
            .split_once(':')
            .and_then(|(_, m)| u64::from_str_radix(m.trim(), 16).ok());
        // Signals 1..=31; the C library's real-time signals 32 and 33 may stay.
        check!(
            mask.is_some_and(|m| m & ((1u64 << 31) - 1) == 0),
            "signals ignored or blocked in an exec'd process: {line}"
        );
    }
    // Docker's form: a process.json, detached, with a pid file.
    let process = b.dir.path().join("process.json");
    let spec = json!({"cwd": "/", "args": ["sh", "-c", "echo from-exec > /tmp/marker; sleep 100"],
                      "env": ["PATH=/bin:/sbin"], "user": {"uid": 0, "gid": 0}, "terminal": false});
    std::fs::write(&process, spec.to_string()).unwrap();
    let pid_file = b.dir.path().join("exec.pid");
    rt.must(&[
        "exec",
        "--process",
        process.to_str().unwrap(),
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "ex",
    ])?;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    check!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "exec pid {pid} not alive"
    );
    let start = Instant::now();
    loop {
        let out = rt.run(&["exec", "ex", "cat", "/tmp/marker"]);
        if out.stdout == "from-exec\n" {
            break;
        }
        check!(
            start.elapsed() < rt.settle,
            "detached exec did not run: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.must(&["kill", "ex", "KILL"])?;
    rt.wait_status("ex", "stopped")?;
    let out = rt.run(&["exec", "ex", "true"]);
    check!(!out.ok(), "exec in a stopped container succeeded: {out}");
    rt.must(&["delete", "ex"])?;
    Ok(())
}

fn pause_resume(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100");
    rt.must(&["create", "--bundle", b.path(), "pr"])?;
    rt.must(&["start", "pr"])?;
    rt.wait_status("pr", "running")?;
    rt.must(&["pause", "pr"])?;
    check!(rt.status("pr")? == "paused", "not paused");
    let pid = rt.state("pr")?["pid"].as_i64().unwrap();
    let freezer = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    check!(!freezer.is_empty(), "no cgroup for {pid}");
    rt.must(&["resume", "pr"])?;
    check!(rt.status("pr")? == "running", "not running after resume");
    rt.must(&["delete", "--force", "pr"])?;
    Ok(())
}

fn console_socket(rt: &Runtime) -> CaseResult {
    let b = sh_with("tty; echo console-ok", |c| {
        c["process"]["terminal"] = json!(true)
    });
    let sock = b.dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || -> Result<OwnedFd, String> {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        recv_fd(stream.as_raw_fd())
    });
    rt.must(&[
        "create",
        "--bundle",
        b.path(),
        "--console-socket",
        sock.to_str().unwrap(),
        "cs",
    ])?;
    let master = receiver.join().unwrap()?;
    // SAFETY: isatty only inspects the fd we own.
    let tty = unsafe { libc::isatty(master.as_raw_fd()) };
    check!(tty == 1, "received fd is not a tty");
    rt.must(&["start", "cs"])?;
    let mut file = File::from(master);
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    let start = Instant::now();
    while !seen.contains("console-ok") && start.elapsed() < Duration::from_secs(10) {
        match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    check!(
        seen.contains("console-ok") && seen.contains("/dev/"),
        "pty output {seen:?}"
    );
    rt.wait_status("cs", "stopped")?;
    rt.must(&["delete", "cs"])?;
    Ok(())
}

/// Receives one fd over SCM_RIGHTS, as runc's `recvtty` does.
fn recv_fd(sock: i32) -> Result<OwnedFd, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(|e| e.to_string())?;
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd in our table; we own it now.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err("no fd in the console socket message".into())
}

fn errors(rt: &Runtime) -> CaseResult {
    let names = |out: &Out, what: &str| !rt.strict_messages || out.stderr.contains(what);
    let out = rt.run(&["state", "no-such-id"]);
    check!(!out.ok() && names(&out, "no-such-id"), "unknown id: {out}");
    let b = sh("sleep 100");
    rt.must(&["create", "--bundle", b.path(), "dup"])?;
    let out = rt.run(&["create", "--bundle", b.path(), "dup"]);
    check!(
        !out.ok() && names(&out, "\"dup\" already exists"),
        "duplicate id: {out}"
    );
    check!(
        rt.status("dup")? == "created",
        "duplicate create hurt the first"
    );
    rt.must(&["delete", "--force", "dup"])?;
    let bad = sh_with("true", |c| c["process"]["user"]["uid"] = json!("root"));
    let out = rt.run(&["create", "--bundle", bad.path(), "bad"]);
    check!(
        !out.ok() && out.stderr.contains("process.user.uid"),
        "bad config.json: {out}"
    );
    let out = rt.run(&["create", "--bundle", "/nonexistent-bundle", "nob"]);
    check!(
        !out.ok() && names(&out, "/nonexistent-bundle"),
        "missing bundle: {out}"
    );
    let out = rt.run(&["create", "--bundle", b.path(), "bad/id"]);
    check!(!out.ok(), "id with a slash: {out}");
    let list = rt.must(&["list", "-q"])?;
    check!(
        list.stdout.trim().is_empty(),
        "failed creates left state: {list}"
    );
    // A section for another platform: husk refuses it and names it (runc ignores it).
    let foreign = sh("true");
    let cfg = foreign.dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen('{', "{\"windows\": {},", 1);
    std::fs::write(&cfg, text).unwrap();
    let out = rt.run(&["create", "--bundle", foreign.path(), "nob"]);
    check!(
        !rt.strict_messages || (!out.ok() && names(&out, "`windows`")),
        "unsupported field: {out}"
    );
    Ok(())
}

fn docker_sequence(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100");
    let d = b.dir.path();
    let (log, pid, epid, proc_json) = (
        d.join("log.json"),
        d.join("pid"),
        d.join("epid"),
        d.join("p.json"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (log, pid, epid, proc_json) = (s(&log), s(&pid), s(&epid), s(&proc_json));
    std::fs::write(&proc_json, json!({"cwd": "/", "args": ["sleep", "50"], "env": ["PATH=/bin:/sbin"], "user": {"uid": 0, "gid": 0}}).to_string()).unwrap();
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    rt.must(&[
        "--log",
        &log,
        "--log-format",
        "json",
        "create",
        "--bundle",
        b.path(),
        "--pid-file",
        &pid,
        id,
    ])?;
    rt.must(&["--log", &log, "--log-format", "json", "start", id])?;
    rt.must(&[
        "--log",
        &log,
        "--log-format",
        "json",
        "exec",
        "--process",
        &proc_json,
        "--detach",
        "--pid-file",
        &epid,
        id,
    ])?;
    check!(Path::new(&epid).exists(), "exec pid file missing");
    rt.must(&["--log", &log, "--log-format", "json", "kill", id, "15"])?;
    // PID 1 ignores an unhandled SIGTERM: Docker follows with SIGKILL.
    rt.must(&["--log", &log, "--log-format", "json", "kill", id, "9"])?;
    rt.wait_status(id, "stopped")?;
    rt.must(&[
        "--log",
        &log,
        "--log-format",
        "json",
        "delete",
        "--force",
        id,
    ])?;
    // A failure is logged as JSON.
    let out = rt.run(&["--log", &log, "--log-format", "json", "start", "missing-id"]);
    check!(!out.ok(), "start of a missing id succeeded");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last).map_err(|e| format!("log line {last:?}: {e}"))?;
    check!(
        v["level"] == "error" && v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "log line {last}"
    );
    Ok(())
}

fn delete_leaves_nothing(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100");
    rt.must(&["create", "--bundle", b.path(), "dl"])?;
    rt.must(&["start", "dl"])?;
    rt.wait_status("dl", "running")?;
    let pid = rt.state("dl")?["pid"].as_i64().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mem = cgroup
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    rt.must(&["delete", "--force", "dl"])?;
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Guest templates are the root's cache, not a container's state.
    let left: Vec<_> = std::fs::read_dir(rt.root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != husk::sandbox::vm::TEMPLATES_DIR)
        .collect();
    check!(left.is_empty(), "state left under --root: {left:?}");
    // In a VM the state's pid is the vmm daemon's: its cgroup is not the container's.
    if let Some(mem) = mem.filter(|m| m != "/" && !rt.vm) {
        let dir = format!("/sys/fs/cgroup/memory{mem}");
        check!(!Path::new(&dir).exists(), "cgroup {dir} left behind");
    }
    Ok(())
}

fn list_and_features(rt: &Runtime) -> CaseResult {
    let b = sh("sleep 100");
    rt.must(&["create", "--bundle", b.path(), "ls1"])?;
    let out = rt.must(&["list", "--format", "json"])?;
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))?;
    check!(
        v.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["id"] == "ls1" && c["status"] == "created")),
        "{out}"
    );
    let out = rt.must(&["list", "-q"])?;
    check!(out.stdout.trim() == "ls1", "{out}");
    rt.must(&["delete", "--force", "ls1"])?;
    let out = rt.must(&["features"])?;
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))?;
    check!(
        v["ociVersionMin"].is_string() && v["linux"]["namespaces"].is_array(),
        "{out}"
    );
    Ok(())
}

type Case = (
    &'static str,
    fn(&Runtime) -> CaseResult,
    &'static [&'static str],
);

const CASES: &[Case] = &[
    ("lifecycle", lifecycle, &["lc"]),
    ("exit_code", exit_code, &["ec"]),
    ("hostname", hostname, &["hn"]),
    ("env", env, &["env"]),
    ("cwd", cwd, &["cwd"]),
    ("user", user, &["user"]),
    ("rlimits", rlimits, &["rl"]),
    ("readonly_root", readonly_root, &["ro", "rw"]),
    ("mounts", mounts, &["mnt"]),
    ("bind_mounts", bind_mounts, &["bm"]),
    (
        "masked_and_readonly_paths",
        masked_and_readonly_paths,
        &["mask"],
    ),
    ("seccomp", seccomp, &["sc"]),
    (
        "kill_signals",
        kill_signals,
        &["ks-name", "ks-short", "ks-num", "ks-kill"],
    ),
    ("kill_all_and_ps", kill_all, &["ka"]),
    ("exec", exec, &["ex"]),
    ("pause_resume", pause_resume, &["pr"]),
    ("console_socket", console_socket, &["cs"]),
    ("errors", errors, &["dup", "bad", "nob"]),
    (
        "docker_sequence",
        docker_sequence,
        &["0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"],
    ),
    ("delete_leaves_nothing", delete_leaves_nothing, &["dl"]),
    ("list_and_features", list_and_features, &["ls1"]),
];

/// Runs the cases of `rt` (all, or those whose name contains `only`); returns (passed, failed).
fn run_suite(rt: &Runtime, only: Option<&str>) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for (name, case, ids) in CASES {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let started = Instant::now();
        let result = case(rt);
        for id in *ids {
            rt.cleanup(id);
        }
        match result {
            Ok(()) => {
                passed += 1;
                eprintln!("  {}: {name}: ok ({:.1?})", rt.name, started.elapsed());
            }
            Err(e) => {
                failed += 1;
                eprintln!("  {}: {name}: FAILED: {e}", rt.name);
            }
        }
    }
    (passed, failed)
}

#[test]
fn conformance() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the conformance suite needs root (namespaces, cgroups, mounts)");
    }
    let husk = target_dir().join("husk");
    assert!(
        husk.exists() && target_dir().join("husk-rootfs").exists(),
        "build the binaries first: cargo build -p husk -p husk-rootfs"
    );
    let only = std::env::var("HUSK_CONFORMANCE_ONLY").ok();
    let husk_rt = Runtime::new(
        "husk-container",
        husk.clone(),
        &["--isolation", "container"],
        true,
    );
    let (hp, hf) = run_suite(&husk_rt, only.as_deref());
    let (vm_summary, vf) = if std::env::var("HUSK_CONFORMANCE_VM").as_deref() == Ok("0") {
        ("husk-vm not run (HUSK_CONFORMANCE_VM=0)".to_string(), 0)
    } else {
        let _vm = husk_tests::vm_lock::hold();
        let vm_rt =
            Runtime::new("husk-vm", husk.clone(), &["--isolation", "vm"], true).with_vm_timeouts();
        // Every case: the first sandbox boots cold and makes the root's guest template,
        // the others start from it (~30 s each here).
        let (vp, vf) = run_suite(&vm_rt, only.as_deref());
        (format!("husk-vm {vp} passed, {vf} failed"), vf)
    };
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let runc_summary = match runc {
        Some(bin) => {
            let runc = Runtime::new("runc", bin, &[], false);
            let (rp, rf) = run_suite(&runc, only.as_deref());
            format!("runc {rp} passed, {rf} failed")
        }
        None => "runc not installed".to_string(),
    };
    let summary = format!(
        "conformance: husk-container {hp} passed, {hf} failed; {vm_summary}; {runc_summary}"
    );
    println!("{summary}");
    eprintln!("{summary}");
    assert_eq!(
        hf, 0,
        "husk-container failed {hf} conformance case(s); see the lines above"
    );
    assert_eq!(
        vf, 0,
        "husk-vm failed {vf} conformance case(s); see the lines above"
    );
    assert!(hp > 0, "no case ran");
}
