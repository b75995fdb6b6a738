//! Tier 2: the `--isolation vm` backend (the `husk vmm` daemon, its control socket,
//! stdio relays, exec helpers, the share bind mount) driven through the `husk` CLI, with
//! the test-only guest `HUSK_TEST_GUEST=host-agent`: `husk-agent --unix-dir` on the host
//! instead of a microVM, so the whole lifecycle runs in seconds.
//!
//! Needs root and the built binaries (`cargo build -p husk -p husk-agent -p husk-rootfs`).

use std::fs::File;
use std::time::{Duration, Instant};

use husk_tests::cli::{cmdline, edit_config, reap, writable_bundle as bundle, Guest, Husk};
use nix::unistd::Pid;
use serde_json::Value;

/// Every command and wait here: the host-agent guest answers in well under a second.
const T: Duration = Duration::from_secs(30);

#[test]
fn create_start_exit_code_stdio_and_share() {
    let mut h = Husk::new(Guest::HostAgent);
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
    h.track(&["c1"]);
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&e).unwrap()
    );
    let st = h.state("c1", T);
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
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        husk::daemon::DAEMON_PROCESS_NAME,
        "ps names it"
    );
    let mount = h.root().join("c1/share/c1/rootfs");
    assert!(
        mount.join("bin/busybox").exists(),
        "rootfs not bound at {mount:?}"
    );
    assert!(std::fs::read(&o).unwrap().is_empty(), "ran before start");
    h.must(&["start", "c1"], T);
    h.wait_status("c1", "running", Duration::from_secs(20));
    assert!(
        !h.run_for(&["start", "c1"], T).stderr.is_empty(),
        "second start must fail"
    );
    let out = h.run_for(&["delete", "c1"], T);
    assert!(
        out.code != Some(0) && out.stderr.contains("--force"),
        "delete of running: {out:?}"
    );
    std::fs::write(b.path().join("rootfs/go"), "").unwrap();
    assert_eq!(
        reap(pid as i32, T),
        7,
        "the daemon exits with the container's code"
    );
    assert_eq!(std::fs::read_to_string(&o).unwrap(), "out\n");
    assert_eq!(std::fs::read_to_string(&e).unwrap(), "err\n");
    let st = h.state("c1", T);
    assert!(st["status"] == "stopped" && st["pid"] == 0, "{st}");
    h.must(&["delete", "c1"], T);
    assert!(h.run_for(&["state", "c1"], T).code != Some(0));
    assert!(
        b.path().join("rootfs/bin/busybox").exists(),
        "delete must not touch the bundle"
    );
    h.assert_nothing_left();
}

#[test]
fn host_bind_mounts_go_through_the_share_and_delete_undoes_them() {
    let mut h = Husk::new(Guest::HostAgent);
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in"), "from-host\n").unwrap();
    let b = bundle("cat /data/in; echo from-container > /data/out; sleep 100");
    let source = host.path().to_owned();
    edit_config(b.path(), |c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": source, "options": ["rbind"]
        }))
    });
    let bb = b.path().to_str().unwrap();
    h.must(&["create", "--bundle", bb, "bm1"], T);
    h.track(&["bm1"]);
    // Bound into the share, where the guest finds it, and the spec says so.
    let point = h.root().join("bm1/share/bm1/mounts");
    let bound: Vec<_> = std::fs::read_dir(&point).unwrap().flatten().collect();
    assert_eq!(bound.len(), 1, "one host bind mount in {point:?}");
    assert_eq!(
        std::fs::read_to_string(bound[0].path().join("in")).unwrap(),
        "from-host\n"
    );
    h.must(&["start", "bm1"], T);
    let deadline = Instant::now() + T;
    while !host.path().join("out").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap_or_default(),
        "from-container\n"
    );
    h.must(&["delete", "--force", "bm1"], T);
    assert!(!point.exists(), "delete must unmount and remove {point:?}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("in")).unwrap(),
        "from-host\n",
        "delete must not touch the host directory"
    );
    h.assert_nothing_left();
}

#[test]
fn run_relays_stdin_and_propagates_the_exit_code() {
    let mut h = Husk::new(Guest::HostAgent);
    let b = bundle("read x; echo got:$x; echo oops >&2; exit 3");
    let out = h.run_with_stdin(
        &["run", "--bundle", b.path().to_str().unwrap(), "r1"],
        Some("hello\n"),
        T,
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "got:hello\n", "{out:?}");
    assert_eq!(out.stderr, "oops\n", "{out:?}");
    assert!(
        h.run_for(&["state", "r1"], T).code != Some(0),
        "run must delete the container"
    );
    h.assert_nothing_left();
}

#[test]
fn exec_kill_and_dead_daemon() {
    let mut h = Husk::new(Guest::HostAgent);
    let b = bundle("sleep 100");
    let bp = b.path().to_str().unwrap().to_string();
    h.must(&["create", "--bundle", &bp, "e1"], T);
    assert!(
        h.run_for(&["exec", "e1", "true"], T)
            .stderr
            .contains("created"),
        "exec before start must fail"
    );
    h.must(&["start", "e1"], T);
    h.wait_status("e1", "running", Duration::from_secs(20));
    let out = h.run_for(
        &[
            "exec",
            "--env",
            "X=1",
            "--cwd",
            "/tmp",
            "e1",
            "sh",
            "-c",
            "echo $X $(pwd); exit 5",
        ],
        T,
    );
    assert!(out.code == Some(5) && out.stdout == "1 /tmp\n", "{out:?}");
    // Docker's form: process.json, detached, pid file; the pid is the exec relay's.
    let process = b.path().join("p.json");
    std::fs::write(&process, r#"{"cwd":"/","args":["sh","-c","echo hi > /marker; sleep 100"],"env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#).unwrap();
    let epid = b.path().join("epid");
    h.must(
        &[
            "exec",
            "--process",
            process.to_str().unwrap(),
            "--detach",
            "--pid-file",
            epid.to_str().unwrap(),
            "e1",
        ],
        T,
    );
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
    let comm = std::fs::read_to_string(format!("/proc/{exec_pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        husk::daemon::EXEC_RELAY_PROCESS_NAME,
        "ps names it"
    );
    let start = Instant::now();
    while !b.path().join("rootfs/marker").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "detached exec did not run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = h.state("e1", T)["pid"].as_i64().unwrap();
    h.must(&["kill", "e1", "KILL"], T);
    assert_eq!(reap(pid as i32, T), 137);
    // The exec relay ends with its process (killed with the container).
    reap(exec_pid as i32, T);
    h.wait_status("e1", "stopped", Duration::from_secs(20));
    let out = h.run_for(&["exec", "e1", "true"], T);
    assert!(
        out.code != Some(0) && out.stderr.contains("stopped"),
        "{out:?}"
    );
    assert!(
        h.run_for(&["kill", "e1", "KILL"], T).code != Some(0),
        "kill of a stopped container must fail"
    );
    h.must(&["delete", "e1"], T);

    // A daemon killed from outside: the container reads as stopped, delete cleans up
    // (the share mount and the orphaned guest included).
    h.must(&["create", "--bundle", &bp, "e2"], T);
    h.must(&["start", "e2"], T);
    let pid = h.state("e2", T)["pid"].as_i64().unwrap();
    nix::sys::signal::kill(Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).unwrap();
    reap(pid as i32, T);
    let st = h.state("e2", T);
    assert!(st["status"] == "stopped" && st["pid"] == 0, "{st}");
    h.must(&["delete", "e2"], T);
    std::fs::remove_file(b.path().join("rootfs/marker")).unwrap();
    h.assert_nothing_left();
}

/// A hook that appends the state it gets on stdin, one line per run, to `dir/<stage>`.
fn recording_hook(dir: &std::path::Path, stage: &str) -> Value {
    let file = dir.join(stage);
    serde_json::json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat >> {}; echo >> {}", file.display(), file.display())],
    })
}

/// The states one recording hook got, one per run.
fn recorded(dir: &std::path::Path, stage: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(stage))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{stage}: {e}: {l}")))
        .collect()
}

/// The hook of `stage` ran exactly once and got container `hk` in `status` with `pid`.
fn assert_ran_once(dir: &std::path::Path, stage: &str, status: &str, pid: i64) {
    let states = recorded(dir, stage);
    assert_eq!(states.len(), 1, "{stage} ran {} times", states.len());
    let state = &states[0];
    assert_eq!(state["id"], "hk", "{stage}: {state}");
    assert_eq!(state["status"], status, "{stage}: {state}");
    assert_eq!(state["pid"], pid, "{stage}: {state}");
}

#[test]
fn runtime_hooks_run_once_on_the_host_around_a_vm_container() {
    let mut h = Husk::new(Guest::HostAgent);
    let b = bundle("while [ ! -e /go ]; do sleep 0.05; done");
    let seen = tempfile::tempdir().unwrap();
    let stages = ["prestart", "createRuntime", "poststart", "poststop"];
    edit_config(b.path(), |config| {
        for stage in stages {
            config["hooks"][stage] = serde_json::json!([recording_hook(seen.path(), stage)]);
        }
    });
    h.must(&["create", "--bundle", b.path().to_str().unwrap(), "hk"], T);
    h.track(&["hk"]);
    let pid = h.state("hk", T)["pid"].as_i64().unwrap();
    // Run by the lifecycle on the host, and only there: the guest's spec has none of them
    // (with the host-agent guest a hook left in it would run a second time, here).
    for stage in ["prestart", "createRuntime"] {
        assert_ran_once(seen.path(), stage, "created", pid);
    }
    assert!(
        recorded(seen.path(), "poststart").is_empty(),
        "poststart before start"
    );
    h.must(&["start", "hk"], T);
    assert_ran_once(seen.path(), "poststart", "running", pid);
    std::fs::write(b.path().join("rootfs/go"), "").unwrap();
    h.wait_status("hk", "stopped", T);
    assert!(
        recorded(seen.path(), "poststop").is_empty(),
        "poststop before delete"
    );
    h.must(&["delete", "hk"], T);
    assert_ran_once(seen.path(), "poststop", "stopped", 0);

    // A failing createRuntime hook fails create, names the hook, and leaves nothing.
    edit_config(b.path(), |config| {
        config["hooks"] = serde_json::json!({
            "createRuntime": [{"path": "/bin/false", "args": ["false"]}],
        });
    });
    let out = h.run_for(
        &["create", "--bundle", b.path().to_str().unwrap(), "hk2"],
        T,
    );
    assert!(
        out.code != Some(0) && out.stderr.contains("createRuntime hook /bin/false"),
        "{out:?}"
    );
    assert!(
        h.run_for(&["state", "hk2"], T).code != Some(0),
        "hk2 left behind"
    );
    h.assert_nothing_left();
}

#[test]
fn bad_input_leaves_nothing() {
    let mut h = Husk::new(Guest::HostAgent);
    let b = bundle("true");
    std::fs::rename(b.path().join("rootfs"), b.path().join("elsewhere")).unwrap();
    let out = h.run_for(
        &["create", "--bundle", b.path().to_str().unwrap(), "bad"],
        T,
    );
    assert!(
        out.code != Some(0) && out.stderr.contains("rootfs"),
        "{out:?}"
    );
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(b.path().join("config.json")).unwrap()).unwrap();
    std::fs::rename(b.path().join("elsewhere"), b.path().join("rootfs")).unwrap();
    config["process"]["terminal"] = Value::Bool(true);
    std::fs::write(b.path().join("config.json"), config.to_string()).unwrap();
    let out = h.run_for(
        &["create", "--bundle", b.path().to_str().unwrap(), "bad"],
        T,
    );
    assert!(
        out.code != Some(0) && out.stderr.contains("--console-socket"),
        "{out:?}"
    );
    h.assert_nothing_left();
}

#[test]
fn ps_update_stats_and_kill_all_reach_the_guest_container() {
    let mut h = Husk::new(Guest::HostAgent);
    // `sh -c "sleep 100"` execs sleep: the init is a sleep, PID 1 of its namespace with
    // no USR1 handler, so USR1 to all ends only the two exec'd sleeps.
    let b = bundle("sleep 100");
    let bp = b.path().to_str().unwrap().to_string();
    h.must(&["create", "--bundle", &bp, "p1"], T);
    h.must(&["start", "p1"], T);
    h.wait_status("p1", "running", Duration::from_secs(20));
    for _ in 0..2 {
        h.must(&["exec", "--detach", "p1", "sleep", "100"], T);
    }
    let ps = |h: &mut Husk| -> Vec<i64> {
        let out = h.must(&["ps", "--format", "json", "p1"], T);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ps: {e}: {out:?}"))
    };
    let start = Instant::now();
    let pids = loop {
        let pids = ps(&mut h);
        if pids.len() == 3 || start.elapsed() > Duration::from_secs(10) {
            break pids;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(pids.len(), 3, "init and two execs: {pids:?}");

    h.must(&["update", "--pids-limit", "42", "p1"], T);
    let out = h.must(&["events", "--stats", "p1"], T);
    let event: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(event["data"]["pids"]["limit"], 42, "{event}");
    assert_eq!(event["data"]["pids"]["current"], 3, "{event}");

    h.must(&["kill", "--all", "p1", "USR1"], T);
    let start = Instant::now();
    while ps(&mut h).len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "USR1 to all must end the execs, not the init: {:?}",
            ps(&mut h)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(h.state("p1", T)["status"], "running");

    h.must(&["kill", "p1", "KILL"], T);
    h.wait_status("p1", "stopped", Duration::from_secs(20));
    assert_eq!(
        ps(&mut h),
        Vec::<i64>::new(),
        "a stopped container has no processes"
    );
    h.must(&["delete", "p1"], T);
    h.assert_nothing_left();
}

/// CRI annotations making a bundle the pod `pod`'s sandbox container or one of its members.
fn pod_role(bundle: &std::path::Path, role: &str, pod: &str) {
    edit_config(bundle, |c| {
        c["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": role,
            "io.kubernetes.cri.sandbox-id": pod,
        })
    });
}

/// A member joins the sandbox's namespaces that its spec names by (host) path.
fn join_by_path(bundle: &std::path::Path, kinds: &[(&str, &str)]) {
    edit_config(bundle, |c| {
        let namespaces = c["linux"]["namespaces"].as_array_mut().unwrap();
        for (kind, proc_name) in kinds {
            namespaces.retain(|n| n["type"] != *kind);
            let path = format!("/proc/1/ns/{proc_name}");
            namespaces.push(serde_json::json!({"type": kind, "path": path}));
        }
        c.as_object_mut().unwrap().remove("hostname");
    });
}

#[test]
fn a_pod_member_runs_in_its_sandbox_and_joins_its_namespaces() {
    let mut h = Husk::new(Guest::HostAgent);
    let sandbox = bundle("echo from-sandbox | nc -l -p 7777; sleep 100");
    pod_role(sandbox.path(), "sandbox", "pod1");
    edit_config(sandbox.path(), |c| c["hostname"] = "podhost".into());
    h.must(
        &[
            "create",
            "--bundle",
            sandbox.path().to_str().unwrap(),
            "pod1",
        ],
        T,
    );
    h.track(&["pod1"]);
    h.must(&["start", "pod1"], T);
    let root = h.root().to_string_lossy().into_owned();
    let daemons = move || {
        husk_tests::cli::processes_naming(&root)
            .iter()
            .filter(|p| p.contains("vmm daemon"))
            .count()
    };
    assert_eq!(daemons(), 1, "the sandbox's daemon");

    step_member_exit_code_and_namespaces(&mut h);
    assert_eq!(
        daemons(),
        1,
        "a member must not start a VM daemon of its own"
    );

    // Killed through the agent; its process reports the signal.
    let (_app2, pid) = start_sleeping_member(&mut h, "app2");
    h.wait_status("app2", "running", T);
    let out = h.run_for(&["pause", "app2"], T);
    assert!(
        out.code != Some(0)
            && out
                .stderr
                .contains("pause the pod's sandbox container pod1"),
        "{out:?}"
    );
    h.must(&["kill", "app2", "KILL"], T);
    assert_eq!(reap(pid as i32, T), 128 + 9);
    h.must(&["delete", "app2"], T);
    assert_eq!(h.state("pod1", T)["status"], "running", "the pod goes on");

    // A member whose sandbox does not exist: a clear error, nothing made.
    let lost = bundle("true");
    pod_role(lost.path(), "container", "nopod");
    let out = h.run_for(
        &["create", "--bundle", lost.path().to_str().unwrap(), "lost1"],
        T,
    );
    assert!(
        out.code != Some(0)
            && out.stderr.contains("nopod")
            && out.stderr.contains("create the sandbox container first"),
        "{out:?}"
    );
    assert!(h.run_for(&["state", "lost1"], T).code != Some(0));

    // The sandbox deleted before a member: the member's share goes with the sandbox's,
    // the member stops with the pod's guest, and its own delete then succeeds.
    let (_app3, pid) = start_sleeping_member(&mut h, "app3");
    h.must(&["delete", "--force", "pod1"], T);
    reap(pid as i32, T);
    assert_eq!(h.state("app3", T)["status"], "stopped");
    h.must(&["delete", "app3"], T);
    h.assert_nothing_left();
}

/// Creates and starts member `id` of pod1 running `sleep 100`; returns its bundle and pid.
fn start_sleeping_member(h: &mut Husk, id: &str) -> (tempfile::TempDir, i64) {
    let m = bundle("sleep 100");
    pod_role(m.path(), "container", "pod1");
    h.must(&["create", "--bundle", m.path().to_str().unwrap(), id], T);
    h.track(&[id]);
    let pid = h.state(id, T)["pid"].as_i64().unwrap();
    h.must(&["start", id], T);
    (m, pid)
}

fn step_member_exit_code_and_namespaces(h: &mut Husk) {
    let m = bundle("hostname; cat /marker; nc -w 60 127.0.0.1 7777 </dev/null; exit 5");
    pod_role(m.path(), "container", "pod1");
    join_by_path(m.path(), &[("uts", "uts"), ("network", "net")]);
    // The bundle's root is read-only inside the container only.
    std::fs::write(m.path().join("rootfs/marker"), "member-rootfs\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("out");
    let e = dir.path().join("err");
    let status = h
        .command(&["create", "--bundle", m.path().to_str().unwrap(), "app1"])
        .stdout(File::create(&o).unwrap())
        .stderr(File::create(&e).unwrap())
        .status()
        .unwrap();
    h.track(&["app1"]);
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&e).unwrap()
    );
    let st = h.state("app1", T);
    assert_eq!(st["status"], "created", "{st}");
    let pid = st["pid"].as_i64().unwrap();
    assert!(cmdline(pid).contains("vmm member"), "{}", cmdline(pid));
    let mount = h.root().join("pod1/share/app1/rootfs");
    assert!(
        mount.join("bin/busybox").exists(),
        "member rootfs not in the sandbox's share"
    );
    h.must(&["start", "app1"], T);
    assert_eq!(
        reap(pid as i32, T),
        5,
        "the member process exits with the member's code"
    );
    assert_eq!(
        std::fs::read_to_string(&o).unwrap(),
        "podhost\nmember-rootfs\nfrom-sandbox\n",
        "the member sees the sandbox's hostname and localhost (its uts and network namespaces) and its own rootfs; stderr: {}",
        std::fs::read_to_string(&e).unwrap()
    );
    assert_eq!(h.state("app1", T)["status"], "stopped");
    h.must(&["delete", "app1"], T);
    assert!(
        !h.root().join("pod1/share/app1").exists(),
        "delete removes the member's share"
    );
}

#[test]
fn printing_commands_end_quietly_when_their_reader_goes_away() {
    let h = Husk::new(Guest::HostAgent);
    for args in [
        &["features"][..],
        &["spec", "--bundle", "/nonexistent-bundle-dir"][..],
    ] {
        let mut child = h
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is read.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
