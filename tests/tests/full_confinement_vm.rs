//! Tier 3, full path: the confinement of a real VM sandbox's `husk vmm` daemon, in ONE
//! guest boot (the steps share the sandbox; each is named). Read from /proc, never from
//! the daemon's own claims:
//! 1. every thread of the daemon runs under a seccomp filter (`Seccomp: 2`) with no
//!    capability in any set and no_new_privs, and the daemon's log names the filter
//!    installed on each VMM thread;
//! 2. `husk inspect --format json` agrees with /proc (pid, uid, capabilities, threads,
//!    namespaces, root, RSS of the VMM and of virtiofsd) and reports the guest kernel,
//!    the allowlist sizes and KVM exit counters that grow while the guest runs;
//! 3. the container in the VM cannot see a host file outside its share;
//! 4. the vmm is jailed: a non-zero uid (the per-VM one), PID 1 of its own pid
//!    namespace, its root is the jail directory (same inode; no host /etc), its mount,
//!    pid, ipc, uts and net namespaces differ from the host's, it sits in its cgroups
//!    with the memory limit sized from the guest plus the overhead, and its virtiofsd
//!    runs outside the jail with the host's view of the share;
//! 5. a syscall outside the control thread's allowlist (a debug-build-only control
//!    request) kills the daemon with SIGSYS; `husk delete` then leaves nothing: no jail
//!    directory, no cgroup, no process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::cli::{bundle, reap, reap_orphans, Guest, Husk};
use husk_tests::procfs::{effective_uid, status_field};
use husk_tests::vm_lock;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn step(name: &str) {
    eprintln!("step: {name}");
}

/// One line of `/proc/<path>/status`, e.g. `Seccomp`.
fn rss_kib(pid: i64) -> i64 {
    status_field(&pid.to_string(), "VmRSS")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn total_exits(report: &Value) -> u64 {
    report["kvm_exits"]
        .as_array()
        .unwrap_or_else(|| panic!("no kvm_exits: {report}"))
        .iter()
        .map(|v| v["counters"]["exits"].as_u64().unwrap())
        .sum()
}

#[test]
fn vmm_daemon_is_confined_and_inspect_reports_it() {
    let _vm = vm_lock::hold();
    let mut h = Husk::new(Guest::MicroVm);
    let marker =
        std::env::temp_dir().join(format!("husk-confinement-marker-{}", std::process::id()));
    std::fs::write(&marker, "host only\n").unwrap();
    let b = bundle("echo started; exec sleep 1000");
    let id = "conf1";
    h.track(&[id]);
    let started = Instant::now();
    h.must(
        &["create", "--bundle", b.path().to_str().unwrap(), id],
        BOOT_TIMEOUT,
    );
    eprintln!(
        "figure: husk create (vm) {} ms",
        started.elapsed().as_millis()
    );
    h.must(&["start", id], CALL_TIMEOUT);
    h.wait_status(id, "running", CALL_TIMEOUT);
    let pid = h.state(id, CALL_TIMEOUT)["pid"].as_i64().unwrap();

    step("every thread of the daemon runs under a seccomp filter");
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = Vec::new();
    for tid in &tids {
        let task = format!("{pid}/task/{tid}");
        let name = std::fs::read_to_string(format!("/proc/{task}/comm")).unwrap();
        assert_eq!(
            status_field(&task, "Seccomp"),
            "2",
            "thread {tid} ({}) has no filter",
            name.trim()
        );
        for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(
                status_field(&task, set),
                "0000000000000000",
                "thread {tid} ({}) keeps {set}",
                name.trim()
            );
        }
        assert_eq!(status_field(&task, "NoNewPrivs"), "1", "thread {tid}");
        names.push(name.trim().to_string());
    }
    for want in ["husk-vcpu0", "husk-vmm", "husk-control"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    eprintln!("threads: {names:?}");
    let log = std::fs::read_to_string(h.root().join(id).join("daemon.log")).unwrap();
    for (kind, thread) in [
        ("vcpu", "husk-vcpu0"),
        ("event_loop", "husk-vmm"),
        ("control", "husk-control"),
    ] {
        assert!(
            log.contains(&format!("seccomp: {kind} filter"))
                && log.contains(&format!("installed on thread {thread} (tid")),
            "the log does not name the {kind} filter on {thread}:\n{log}"
        );
    }

    step("husk inspect --format json agrees with /proc");
    let out = h.must(&["inspect", "--format", "json", id], CALL_TIMEOUT);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    eprintln!("inspect: {}", out.stdout);
    assert_eq!(r["isolation"], "vm");
    assert_eq!(r["process"]["pid"], pid);
    let uid = effective_uid(&pid.to_string());
    assert_eq!(r["process"]["uid"], uid);
    for (key, field) in [
        ("cap_eff", "CapEff"),
        ("cap_prm", "CapPrm"),
        ("cap_bnd", "CapBnd"),
    ] {
        let proc = u64::from_str_radix(&status_field(&pid.to_string(), field), 16).unwrap();
        assert_eq!(r["process"][key], proc, "{key}");
        assert_eq!(proc, 0, "{key}");
    }
    // No core file may hold guest memory.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    let reported: Vec<i64> = r["process"]["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["seccomp"], 2, "{t}");
            t["tid"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(reported.len(), tids.len(), "{reported:?} vs {tids:?}");
    for (kind, ns) in r["process"]["namespaces"].as_object().unwrap() {
        let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        assert_eq!(ns["id"], link.to_string_lossy().as_ref(), "{kind}");
        let mine = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert_eq!(ns["shared_with_host"], link == mine, "{kind}");
    }
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(r["process"]["root"], root.to_string_lossy().as_ref());
    // RSS moves a little between the two reads: within 2 MiB.
    let vmm_rss = r["memory"]["vmm_rss_kib"].as_i64().unwrap();
    assert!((vmm_rss - rss_kib(pid)).abs() < 2048, "vmm rss {vmm_rss}");
    let helpers = r["memory"]["virtiofsd_pids"].as_array().unwrap();
    assert!(!helpers.is_empty(), "no virtiofsd under the daemon: {r}");
    let helper_rss: i64 = helpers.iter().map(|p| rss_kib(p.as_i64().unwrap())).sum();
    let reported_helpers = r["memory"]["virtiofsd_rss_kib"].as_i64().unwrap();
    assert!(
        (reported_helpers - helper_rss).abs() < 2048,
        "virtiofsd rss {reported_helpers} vs {helper_rss}"
    );
    for p in helpers {
        let cmd = std::fs::read_to_string(format!("/proc/{}/comm", p.as_i64().unwrap())).unwrap();
        assert!(cmd.contains("virtiofsd"), "{p} is {cmd:?}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r["kernel"]["host"], host.trim());
    assert_eq!(r["kernel"]["workload_runs_on"], "guest");
    let guest = r["kernel"]["guest"].as_str().unwrap_or_default();
    assert!(
        guest.starts_with("6.") && guest != host.trim(),
        "guest kernel {guest:?}"
    );
    for (kind, n) in r["syscalls"]["vmm_per_thread"].as_object().unwrap() {
        let n = n.as_u64().unwrap();
        assert!(n > 10 && n < 60, "{kind}: {n}");
    }
    assert_eq!(r["syscalls"]["vmm_mode"], "kill");
    let started_at = r["started"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        started_at <= now && now - started_at < BOOT_TIMEOUT.as_secs() + 60,
        "started {started_at}, now {now}"
    );
    let exits_before = total_exits(&r);
    assert!(exits_before > 0, "{r}");

    step("the vmm is jailed");
    let p = pid.to_string();
    let uid = effective_uid(&p);
    assert_ne!(uid, 0, "the vmm runs as root");
    assert_eq!(
        uid,
        i64::from(husk::jailer::uid_for(id)),
        "not the per-VM uid"
    );
    let gid = status_field(&p, "Gid");
    assert_eq!(
        gid.split_whitespace().nth(1),
        Some(uid.to_string().as_str()),
        "gid {gid}"
    );
    // PID 1 of its own pid namespace, seen from the host with its host pid.
    assert_eq!(status_field(&p, "NSpid"), format!("{pid}\t1"));
    let jail = h.root().join(id).join("vm").join(id).join("jail");
    let their_root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let jail_meta = std::fs::metadata(&jail).unwrap();
    assert_eq!(
        (their_root.dev(), their_root.ino()),
        (jail_meta.dev(), jail_meta.ino()),
        "/proc/{pid}/root is not the jail {}",
        jail.display()
    );
    assert!(Path::new(&format!("/proc/{pid}/root/dev/kvm")).exists());
    assert!(Path::new(&format!("/proc/{pid}/root/run/control.sock")).exists());
    for absent in ["etc", "tmp", "proc", "usr"] {
        assert!(
            !Path::new(&format!("/proc/{pid}/root/{absent}")).exists(),
            "/{absent} is in the jail"
        );
    }
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        let mine = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert_ne!(theirs, mine, "the vmm shares the host's {kind} namespace");
        assert_eq!(
            r["process"]["namespaces"][kind]["shared_with_host"], false,
            "{kind}"
        );
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cgroup_dirs: Vec<PathBuf> = husk::jailer::cgroup::CONTROLLERS
        .iter()
        .map(|c| husk::jailer::cgroup::cgroup_dir(Path::new("/sys/fs/cgroup"), c, id))
        .collect();
    for controller in husk::jailer::cgroup::CONTROLLERS {
        assert!(
            cgroups
                .lines()
                .any(|l| l.contains(controller) && l.ends_with(&format!("/husk/{id}"))),
            "not in its {controller} cgroup: {cgroups}"
        );
    }
    let limit: u64 = std::fs::read_to_string(cgroup_dirs[1].join("memory.limit_in_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        limit,
        (husk::vmm::config::DEFAULT_MEM_MIB << 20) + husk::jailer::cgroup::VMM_MEMORY_OVERHEAD
    );
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("the VMM is jailed") && notes.contains(&jail.display().to_string()),
        "inspect notes: {notes}"
    );
    // virtiofsd was started before the jail, in the host's view, with its own sandbox.
    for helper in helpers {
        let hp = helper.as_i64().unwrap();
        let their_mnt = std::fs::read_link(format!("/proc/{hp}/ns/mnt")).unwrap();
        let vmm_mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(
            their_mnt, vmm_mnt,
            "virtiofsd {hp} shares the jail's mounts"
        );
    }

    step("the container cannot see a host file outside its share");
    let m = marker.to_str().unwrap();
    let out = h.exec_for(
        &[
            id,
            "sh",
            "-c",
            &format!("cat {m} 2>&1 || echo absent; cat /proc/version"),
        ],
        CALL_TIMEOUT,
    );
    if out.code != Some(0) {
        // The guest console is in the daemon's log: say why the guest refused.
        let log = std::fs::read_to_string(h.root().join(id).join("daemon.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "daemon.log (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("absent"), "{out:?}");
    assert!(!out.stdout.contains("host only"), "{out:?}");
    assert!(
        !out.stdout.contains(host.trim()),
        "runs on the host kernel: {out:?}"
    );

    step("the KVM exit counters grow while the guest works, the table prints them");
    let table = h.must(&["inspect", id], CALL_TIMEOUT).stdout;
    eprint!("{table}");
    assert!(
        table.contains("kvm vcpu0") && table.contains("exits="),
        "{table}"
    );
    let r: Value = serde_json::from_str(
        &h.must(&["inspect", "--format", "json", id], CALL_TIMEOUT)
            .stdout,
    )
    .unwrap();
    assert!(total_exits(&r) > exits_before, "exits did not grow: {r}");

    step("a syscall outside the control allowlist kills the daemon");
    let socket = jail.join("run").join("control.sock");
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    stream
        .write_all(b"{\"op\":\"forbidden_syscall\"}\n")
        .unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(&stream).read_line(&mut answer);
    assert!(answer.is_empty(), "the daemon answered: {answer:?}");
    assert_eq!(
        reap(pid as i32, CALL_TIMEOUT),
        128 + libc::SIGSYS,
        "the daemon must die of SIGSYS"
    );
    h.wait_status(id, "stopped", CALL_TIMEOUT);
    h.must(&["delete", "--force", id], CALL_TIMEOUT);
    reap_orphans();
    h.assert_nothing_left();
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    std::fs::remove_file(&marker).unwrap();
}
