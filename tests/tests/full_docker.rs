//! Full path: a private dockerd (Moby 26 from Debian trixie, see `husk_tests::docker`)
//! drives husk: as a runc-compatible runtime through containerd's runc shim (`--runtime
//! husk`, container isolation; `--runtime husk-vm`, a microVM) and as a shim v2
//! (`runtimeType` and `--runtime io.containerd.husk.v2`). One dockerd for all steps; each
//! check is a named step; after each, nothing of husk is left: no shim, daemon, relay or
//! virtiofsd, no mount, no state entry.

use std::process::Output;

use husk_tests::docker::{Docker, IMAGE};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn step(name: &str) {
    eprintln!("== step: {name}");
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn docker_drives_the_husk_cli_and_the_shim() {
    let d = Docker::start();
    let run = |runtime: &str, args: &[&str]| {
        let mut all = vec![
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            runtime,
            IMAGE,
        ];
        all.extend_from_slice(args);
        d.docker(&all)
    };

    step("docker run --rm --runtime husk: output and exit code");
    let out = run("husk", &["echo", "hi"]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    assert_eq!(stdout(&out), "hi\n");
    let out = run("husk", &["sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    d.assert_clean();

    step("docker run -d, exec, stop, rm (husk)");
    detached_exec_stop_rm(&d, "husk", "d1");
    d.assert_clean();

    step("docker run with runtimeType io.containerd.husk.v2 (the shim), and by its name");
    let out = run("husk-shim", &["sh", "-c", "echo hi-shim; exit 6"]);
    assert_eq!(stdout(&out), "hi-shim\n", "{}\n{}", text(&out), d.log());
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let out = run("io.containerd.husk.v2", &["echo", "hi"]);
    assert_eq!(stdout(&out), "hi\n", "{}\n{}", text(&out), d.log());
    d.assert_clean();

    step("docker run -d, exec, stop, rm through the shim");
    detached_exec_stop_rm(&d, "husk-shim", "d2");
    d.assert_clean();

    step("docker run --rm --runtime husk-vm: the container runs on the guest kernel");
    husk_tests::vmm::require_kvm();
    let _lock = husk_tests::vm_lock::hold();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let out = run("husk-vm", &["sh", "-c", "echo in-vm; uname -r; exit 5"]);
    let lines = stdout(&out);
    assert_eq!(out.status.code(), Some(5), "{}\n{}", text(&out), d.log());
    assert!(lines.starts_with("in-vm\n"), "{lines}");
    assert!(
        !lines.contains(host.trim()),
        "ran on the host kernel: {lines}"
    );
    d.assert_clean();
}

/// `docker run -d` of a sleeping container, `docker exec` in it (output and exit code),
/// `docker stop` (sleep ignores SIGTERM as PID 1: the SIGKILL after 2 s ends it), `docker rm`.
fn detached_exec_stop_rm(d: &Docker, runtime: &str, name: &str) {
    let out = d.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--runtime",
        runtime,
        "--name",
        name,
        IMAGE,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    let out = d.docker(&["exec", name, "sh", "-c", "echo in-exec; exit 4"]);
    assert_eq!(stdout(&out), "in-exec\n", "{}", text(&out));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = d.docker(&["stop", "-t", "2", name]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    let out = d.docker(&["rm", name]);
    assert!(out.status.success(), "{}", text(&out));
}
