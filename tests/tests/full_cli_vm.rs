//! Tier 3, full path: the `husk` CLI with `--isolation vm` on a real microVM (guest
//! kernel, agent, virtio-fs rootfs, the `husk vmm` daemon). Each test boots one guest
//! (~45-60 s here) and holds `/tmp/husk-vm.lock` (see `husk_tests::vm_lock`).
//!
//! Needs root, /dev/kvm and `scripts/setup.sh` (kernel, initramfs, virtiofsd, binaries).
//! The test process is a child subreaper, as containerd's shim is: the daemon that
//! `create` leaves behind is reparented to it, so its exit status (the container's) can
//! be read with waitpid, as Docker and the shim do.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_tests::cli::{argv, bundle, cmdline, reap, reap_orphans, wait_child, Guest, Husk};
use husk_tests::vm_lock;
use serde_json::{json, Value};

/// Boot plus container creation, with room for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Calls on a running guest (exec creates a process in the guest: seconds here).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One guest at a time, even with the default parallel test threads.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn run_prints_output_relays_stdin_and_propagates_the_exit_code() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _vm = vm_lock::hold();
    let mut h = Husk::new(Guest::MicroVm);
    // The guest kernel's built-in module parameters are in sysfs (patch 0006 adds them
    // one module at a time): shell builtins only, each process costs seconds here.
    let b = bundle(
        "read x; echo hello from a husk microVM: $x; uname -a; \
         echo /sys/module/printk/parameters/*; \
         read t < /sys/module/printk/parameters/time; echo printk.time=$t; \
         echo oops >&2; exit 3",
    );
    h.track(&["r1"]);
    let err = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    let mut child = h
        .command(&["run", "--bundle", b.path().to_str().unwrap(), "r1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"stdin\n").unwrap();
    // The first byte's arrival time, then the rest, from a thread: the pipe's end of
    // file comes only when husk and its daemon are gone.
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut first = [0u8; 1];
        let n = stdout.read(&mut first).unwrap_or(0);
        let at = started.elapsed();
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        let mut all = first[..n].to_vec();
        all.extend(rest);
        let _ = tx.send((at, String::from_utf8_lossy(&all).to_string()));
    });
    let code = wait_child(&mut child, BOOT_TIMEOUT);
    let total = started.elapsed();
    let (first_output, stdout) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("stdout did not end after husk exited");
    let stderr = std::fs::read_to_string(err.path()).unwrap();
    eprintln!(
        "figure: husk run (vm) start -> first output {} ms, -> exit {} ms",
        first_output.as_millis(),
        total.as_millis()
    );
    eprint!("container stdout:\n{stdout}");
    assert_eq!(code, Some(3), "stdout {stdout:?} stderr {stderr:?}");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello from a husk microVM: stdin"));
    let uname = lines.next().unwrap_or_default();
    assert!(
        uname.starts_with("Linux husk "),
        "uname -a is the guest's: {uname:?}"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        !uname.contains(host.trim()),
        "the container ran on the host kernel: {uname:?}"
    );
    let params = lines.next().unwrap_or_default();
    for param in ["ignore_loglevel", "time"] {
        assert!(
            params
                .split(' ')
                .any(|p| p == format!("/sys/module/printk/parameters/{param}")),
            "printk.{param} missing from sysfs: {params:?}"
        );
    }
    assert_eq!(lines.next(), Some("printk.time=Y"));
    assert_eq!(stderr, "oops\n");
    assert!(
        h.run_for(&["state", "r1"], CALL_TIMEOUT).code != Some(0),
        "run must delete the container"
    );
    h.assert_nothing_left();
}

/// The lifecycle on one guest, driven as Docker drives a runc-compatible runtime
/// (shared/substrate.md): `--log L --log-format json create --bundle B --pid-file P`,
/// `start`, `exec --process F --detach --pid-file P`, `kill 15`, `kill 9`,
/// `delete --force`; plus `state` at each step and a foreground `exec`.
#[test]
fn lifecycle_exec_kill_delete_in_the_docker_call_sequence() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _vm = vm_lock::hold();
    let mut h = Husk::new(Guest::MicroVm);
    let b = bundle("echo started; exec sleep 1000");
    let d = b.path();
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let (log, pid_file, exec_pid, process) = (
        s(d.join("log.json")),
        s(d.join("pid")),
        s(d.join("exec.pid")),
        s(d.join("process.json")),
    );
    let process_json = json!({"cwd": "/", "args": ["sleep", "50"], "env": ["PATH=/bin"],
                              "user": {"uid": 0, "gid": 0}});
    std::fs::write(&process, process_json.to_string()).unwrap();
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let docker = |args: &[&str]| -> Vec<String> {
        ["--log", &log, "--log-format", "json"]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    };

    // create: its stdout is the container's; nothing may run before start.
    let out_file = d.join("container.out");
    h.track(&[id]);
    let started = Instant::now();
    let create = docker(&[
        "create",
        "--bundle",
        d.to_str().unwrap(),
        "--pid-file",
        &pid_file,
        id,
    ]);
    let status = {
        let mut child = h
            .command(&argv(&create))
            .stdout(File::create(&out_file).unwrap())
            .stderr(File::create(d.join("create.err")).unwrap())
            .spawn()
            .unwrap();
        wait_child(&mut child, BOOT_TIMEOUT)
    };
    let create_err = std::fs::read_to_string(d.join("create.err")).unwrap_or_default();
    assert_eq!(status, Some(0), "create: {create_err}");
    eprintln!(
        "figure: husk create (vm, boot + container at the exec barrier) {} ms",
        started.elapsed().as_millis()
    );
    let st = h.state(id, CALL_TIMEOUT);
    assert_eq!(st["status"], "created", "{st}");
    let pid = st["pid"].as_i64().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string(),
        "--pid-file holds the state's pid"
    );
    assert!(
        cmdline(pid).contains("vmm daemon"),
        "pid {pid} is not the vmm daemon: {}",
        cmdline(pid)
    );
    assert!(
        std::fs::read(&out_file).unwrap().is_empty(),
        "ran before start"
    );

    h.must(&argv(&docker(&["start", id])), CALL_TIMEOUT);
    h.wait_status(id, "running", CALL_TIMEOUT);
    let start = Instant::now();
    while std::fs::read_to_string(&out_file).unwrap() != "started\n" {
        assert!(
            start.elapsed() < CALL_TIMEOUT,
            "container output: {:?}",
            std::fs::read_to_string(&out_file)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        h.run_for(&["start", id], CALL_TIMEOUT).code != Some(0),
        "a second start must fail"
    );

    let out = h.exec_for(
        &[
            id,
            "sh",
            "-c",
            "echo exec-out $(hostname); echo exec-err >&2; exit 5",
        ],
        CALL_TIMEOUT,
    );
    assert_eq!(out.code, Some(5), "{out:?}");
    assert!(out.stdout.starts_with("exec-out "), "{out:?}");
    assert_eq!(out.stderr, "exec-err\n", "{out:?}");

    // On PVM hosts every container process gets glibc's AVX code turned off (the guest
    // kernel cannot save AVX state there; guest-agent/src/vector_state.rs).
    if husk::host::HostMode::detect() == husk::host::HostMode::Pvm {
        let out = h.exec_for(&[id, "sh", "-c", "echo $GLIBC_TUNABLES"], CALL_TIMEOUT);
        assert!(
            out.stdout.starts_with("glibc.cpu.hwcaps=-AVX,-AVX2,"),
            "{out:?}"
        );
    }

    let exec = docker(&[
        "exec",
        "--process",
        &process,
        "--detach",
        "--pid-file",
        &exec_pid,
        id,
    ]);
    h.must(&argv(&exec), CALL_TIMEOUT);
    let epid: i64 = std::fs::read_to_string(&exec_pid)
        .expect("exec --pid-file written")
        .trim()
        .parse()
        .unwrap();
    assert!(
        Path::new(&format!("/proc/{epid}")).exists(),
        "the exec's host process {epid} is gone"
    );

    // ps: the guest pids of the container's cgroup (the init and the detached exec).
    let out = h.must(&["ps", "--format", "json", id], CALL_TIMEOUT);
    let guest_pids: Vec<i64> = serde_json::from_str(&out.stdout).unwrap();
    assert!(guest_pids.len() >= 2, "init and the exec: {out:?}");

    // pause/resume hold and release the VM's vCPUs; the status follows, as with runc.
    h.must(&argv(&docker(&["pause", id])), CALL_TIMEOUT);
    let st = h.state(id, CALL_TIMEOUT);
    assert_eq!(st["status"], "paused", "{st}");
    let out = h.run_for(&["ps", id], CALL_TIMEOUT);
    assert!(
        out.code != Some(0) && out.stderr.contains("paused"),
        "the agent of a paused VM cannot answer ps; the error says so: {out:?}"
    );
    assert!(
        h.run_for(&["exec", id, "true"], CALL_TIMEOUT).code != Some(0),
        "exec into a paused container must fail"
    );
    // A signal to a paused container (the init ignores SIGTERM) leaves it paused.
    h.must(&argv(&docker(&["kill", id, "15"])), CALL_TIMEOUT);
    let st = h.state(id, CALL_TIMEOUT);
    assert_eq!(st["status"], "paused", "{st}");
    h.must(&argv(&docker(&["resume", id])), CALL_TIMEOUT);
    let st = h.state(id, CALL_TIMEOUT);
    assert_eq!(st["status"], "running", "{st}");
    let out = h.exec_for(&[id, "echo", "resumed"], CALL_TIMEOUT);
    assert_eq!(out.stdout, "resumed\n", "{out:?}");

    // A container init ignores an unhandled SIGTERM: Docker follows with SIGKILL.
    h.must(&argv(&docker(&["kill", id, "15"])), CALL_TIMEOUT);
    h.must(&argv(&docker(&["kill", id, "9"])), CALL_TIMEOUT);
    h.wait_status(id, "stopped", CALL_TIMEOUT);
    assert_eq!(
        reap(pid as i32, CALL_TIMEOUT),
        128 + 9,
        "the daemon exits with the container's status"
    );
    h.must(&argv(&docker(&["delete", "--force", id])), CALL_TIMEOUT);
    assert!(h.run_for(&["state", id], CALL_TIMEOUT).code != Some(0));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_ne!(v["level"], "error", "logged an error: {line}");
    }
    reap_orphans();
    h.assert_nothing_left();
    assert!(
        d.join("rootfs/bin/busybox").exists(),
        "delete must not touch the bundle"
    );
}
