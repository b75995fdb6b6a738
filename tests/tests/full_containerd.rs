//! Full path: a private containerd runs containers through containerd-shim-husk-v2
//! (`ctr run --runtime io.containerd.husk.v2`), container isolation (fast); nothing may
//! be left behind after each test.

use husk_tests::engines::{Containerd, IMAGE};

const RUNTIME: &str = "io.containerd.husk.v2";

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits up to 10 s for task `id` to be reported stopped.
fn wait_stopped(c: &Containerd, id: &str) {
    for _ in 0..100 {
        let ls = text(&c.ctr(&["task", "ls"]));
        if ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("task {id} not stopped after kill");
}

#[test]
fn ctr_run_prints_and_exit_codes_propagate() {
    let c = Containerd::start(Some("container"));
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "hi1",
        "echo",
        "hi",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "ex7",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    c.assert_clean();
}

#[test]
fn exec_and_kill_a_detached_task() {
    let c = Containerd::start(Some("container"));
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "svc",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "svc",
        "sh",
        "-c",
        "echo in-exec; exit 3",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in-exec\n",
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(3));
    // sleep is PID 1 of its namespace and ignores SIGTERM: SIGKILL stops it.
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_stopped(&c, "svc");
    assert!(c.ctr(&["task", "rm", "svc"]).status.success());
    assert!(c.ctr(&["container", "rm", "svc"]).status.success());
    c.assert_clean();
}

#[test]
fn a_cri_pod_shares_one_shim() {
    let c = Containerd::start(Some("container"));
    let pod = |ty: &str| {
        [
            format!("io.kubernetes.cri.container-type={ty}"),
            "io.kubernetes.cri.sandbox-id=pod1".to_string(),
        ]
    };
    let [t1, s1] = pod("sandbox");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &t1,
        "--annotation",
        &s1,
        IMAGE,
        "pod1",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let [t2, s2] = pod("container");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &t2,
        "--annotation",
        &s2,
        IMAGE,
        "app1",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        c.shims().len(),
        1,
        "a pod's containers must share one shim: {:?}",
        c.shims()
    );
    for id in ["app1", "pod1"] {
        let out = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        // This failed once in a clean-clone CI run (session 8) and never since: say why
        // if it happens again.
        assert!(
            out.status.success(),
            "kill {id}: {}\ntasks:\n{}\ncontainerd log:\n{}",
            text(&out),
            text(&c.ctr(&["task", "ls"])),
            c.log()
        );
        wait_stopped(&c, id);
        let out = c.ctr(&["task", "rm", id]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(c.ctr(&["container", "rm", id]).status.success());
    }
    c.assert_clean();
}

#[test]
fn a_bad_default_isolation_is_a_clear_error() {
    let c = Containerd::start(Some("kvm"));
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "bad1", "true"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("HUSK_ISOLATION=\"kvm\"") && err.contains("use vm or container"),
        "{err}"
    );
    let _ = c.ctr(&["container", "rm", "bad1"]);
    c.assert_clean();
}
