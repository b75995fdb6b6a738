//! Full path: a private containerd runs containers in real microVMs through
//! containerd-shim-husk-v2 (`ctr run --runtime io.containerd.husk.v2`), with the shim's
//! default isolation (no `HUSK_ISOLATION`: a VM), and a two-container CRI pod in one VM.
//! One containerd, three guest starts, under
//! the VM lock; each check is a named step. Nothing may be left behind: no shim, vmm
//! daemon, virtiofsd or exec relay, no mount, no state directory.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_tests::engines::{repo, Containerd, IMAGE};

const RUNTIME: &str = "io.containerd.husk.v2";

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

/// `ctr` with room for a guest boot (~45 s) and a container (~15 s) on a loaded machine.
fn ctr(c: &Containerd, args: &[&str]) -> Output {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "5", "600", "ctr", "-a"])
        .arg(c.socket())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "   ctr {} -> {:?} in {:.1?}",
        args.join(" "),
        out.status.code(),
        start.elapsed()
    );
    out
}

/// Waits up to 3 minutes for task `id` to be reported stopped (the guest powers off).
fn wait_stopped(c: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let ls = text(&c.ctr(&["task", "ls"]));
        if ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "task {id} not stopped 3 min after kill; containerd log:\n{}",
        c.log()
    );
}

/// The release of the guest kernel the VMs boot (its `linux_banner`).
fn guest_kernel_release() -> String {
    let vmlinux = std::fs::read(repo().join("target/husk/vmlinux")).expect("target/husk/vmlinux");
    let marker = b"Linux version ";
    let at = vmlinux
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("no Linux version banner in the guest kernel");
    let rest = &vmlinux[at + marker.len()..];
    let end = rest.iter().position(|&b| b == b' ').unwrap();
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

#[test]
fn ctr_runs_tasks_in_microvms() {
    husk_tests::vmm::require_kvm();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string();
    let guest_release = guest_kernel_release();
    assert_ne!(
        host_release, guest_release,
        "the test needs a guest kernel unlike the host's"
    );
    let _lock = husk_tests::vm_lock::hold();
    let c = Containerd::start(None);

    step("ctr run --rm in a VM: output from the guest kernel, exit code propagates");
    let out = ctr(
        &c,
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "vm1",
            "sh",
            "-c",
            "echo hi; uname -r; cat /proc/cmdline; exit 7",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(7), "{}\n{}", text(&out), c.log());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hi"), "{stdout}");
    assert_eq!(lines.get(1), Some(&guest_release.as_str()), "{stdout}");
    assert!(
        lines
            .get(2)
            .is_some_and(|l| l.contains("virtio_mmio.device=")),
        "not the guest's command line: {stdout}"
    );
    step("nothing left after ctr run --rm");
    c.assert_clean();

    step("ctr run -d: a detached task in a VM");
    let out = ctr(
        &c,
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "svc",
            "sleep",
            "1000",
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let ls = text(&c.ctr(&["task", "ls"]));
    assert!(
        ls.lines()
            .any(|l| l.starts_with("svc") && l.contains("RUNNING")),
        "{ls}"
    );

    step("ctr task exec in the running VM: output, guest kernel, exit code");
    let exec = |exec_id: &str| {
        ctr(
            &c,
            &[
                "task",
                "exec",
                "--exec-id",
                exec_id,
                "svc",
                "sh",
                "-c",
                "echo in-exec; uname -r; exit 3",
            ],
        )
    };
    let out = exec("e1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("in-exec\n{guest_release}\n"),
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    step("ctr task kill stops the VM task");
    // sleep is PID 1 of its pid namespace and ignores SIGTERM: SIGKILL stops it.
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_stopped(&c, "svc");
    let out = c.ctr(&["task", "rm", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = c.ctr(&["container", "rm", "svc"]);
    assert!(out.status.success(), "{}", text(&out));

    step("nothing left after kill and delete");
    c.assert_clean();

    pod_in_one_vm(&c, &guest_release);
    step("nothing left after the pod");
    c.assert_clean();

    // As CNI gives it: the task's spec names a network namespace path, and the guest
    // interface gets that namespace's address, route and MTU (a NIC: a cold boot).
    step("ctr run --with-ns network:PATH: the VM task has its namespace's network");
    let (a, _b) = husk_tests::netns::pair("ctn");
    let with_ns = format!("network:{}", a.path().display());
    let out = ctr(
        &c,
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--with-ns",
            &with_ns,
            IMAGE,
            "vmnet",
            "sh",
            "-c",
            "ifconfig vA; ip route; ping -c 1 -W 30 10.200.0.2 >/dev/null && echo peer-answers",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), c.log());
    assert!(stdout.contains("inet addr:10.200.0.1"), "{stdout}");
    assert!(stdout.contains("MTU:1400"), "{stdout}");
    assert!(stdout.contains("default via 10.200.0.2 dev vA"), "{stdout}");
    assert!(stdout.contains("peer-answers"), "{stdout}");
    step("nothing left after the networked task: no tap, no filter");
    a.assert_clean("vA");
    c.assert_clean();
}

/// A two-container pod made with the CRI annotations: the member runs in the sandbox
/// container's VM (no second vmm daemon or virtiofsd) and joins the sandbox's network
/// namespace, named by the host path containerd would give it.
fn pod_in_one_vm(c: &Containerd, guest_release: &str) {
    let annotations = |role: &str| {
        [
            "--annotation".to_string(),
            format!("io.kubernetes.cri.container-type={role}"),
            "--annotation".to_string(),
            "io.kubernetes.cri.sandbox-id=pod2".to_string(),
        ]
    };
    let sandbox_args = annotations("sandbox");
    step("a CRI pod's sandbox container: a VM");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend(sandbox_args.iter().map(String::as_str));
    args.extend([
        IMAGE,
        "pod2",
        "sh",
        "-c",
        "echo from-sandbox | nc -l -p 7777; sleep 1000",
    ]);
    let out = ctr(c, &args);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let ls = text(&c.ctr(&["task", "ls"]));
    let sandbox_pid: i32 = ls
        .lines()
        .find(|l| l.starts_with("pod2 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for pod2 in: {ls}"));

    step("a member of the pod: created in the sandbox's VM, joining its network namespace");
    let member_args = annotations("container");
    let with_ns = format!("network:/proc/{sandbox_pid}/ns/net");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--with-ns", &with_ns];
    args.extend(member_args.iter().map(String::as_str));
    args.extend([IMAGE, "app2", "sleep", "1000"]);
    let out = ctr(c, &args);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let helpers = c.helpers();
    let count = |what: &str| helpers.iter().filter(|(_, cmd)| cmd.contains(what)).count();
    // virtiofsd's sandbox is a second process with the same command line: count sockets.
    let virtiofsd_sockets: std::collections::HashSet<_> = helpers
        .iter()
        .filter(|(_, cmd)| cmd.contains("virtiofsd"))
        .filter_map(|(_, cmd)| {
            cmd.split_whitespace()
                .skip_while(|a| *a != "--socket-path")
                .nth(1)
        })
        .collect();
    assert_eq!(
        (
            count("vmm daemon"),
            virtiofsd_sockets.len(),
            count("vmm member")
        ),
        (1, 1, 1),
        "one VM (one vmm daemon, one virtiofsd) for the pod's two containers: {helpers:?}"
    );
    assert_eq!(c.shims().len(), 1, "one shim for the pod");

    step("exec in the member: the guest kernel, the sandbox's localhost, the exit code");
    let out = ctr(
        c,
        &[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "app2",
            "sh",
            "-c",
            "uname -r; nc -w 120 127.0.0.1 7777 </dev/null; exit 4",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{guest_release}\nfrom-sandbox\n"),
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));

    step("kill and delete the member, then the sandbox");
    for id in ["app2", "pod2"] {
        let out = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(out.status.success(), "{}", text(&out));
        wait_stopped(c, id);
        let out = c.ctr(&["task", "rm", id]);
        assert!(out.status.success(), "{}", text(&out));
        let out = c.ctr(&["container", "rm", id]);
        assert!(out.status.success(), "{}", text(&out));
    }
}
