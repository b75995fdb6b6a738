//! The jailer on the real kernel (needs root and /dev/kvm). This binary re-executes itself
//! as the "vmm": it enters a jail with `Jail::enter`, proves /dev/kvm works for the jail
//! user (KVM_CREATE_VM), installs the event-loop seccomp filter and waits. The test reads
//! `/proc/PID` from outside: seccomp mode 2, empty capability sets, the jail uid, the jail
//! as root, other namespaces, only the kept fds, the cgroup; then makes the vmm call a
//! syscall outside its list (it dies with SIGSYS) and checks `Jail::remove` leaves nothing.
//!
//! `harness = false`: the helper must be single-threaded for unshare + fork.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk::jailer::{cgroup, uid_for, Entered, Jail, JailConfig, Resources};
use husk::seccomp::{self, SeccompMode, ThreadKind};

const ROLE: &str = "HUSK_CONFINE_ROLE";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn main() {
    if std::env::var_os(ROLE).is_some() {
        jailed_vmm();
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        panic!("the confinement tests need root (namespaces, cgroups, mknod); run them as root");
    }
    // The jailed vmm is our grandchild: become a subreaper to reap it and see its signal.
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    let tests: [(&str, fn()); 2] = [
        (
            "jailed_vmm_is_confined_and_can_create_a_vm",
            jailed_vmm_is_confined,
        ),
        (
            "a_failed_jail_leaves_nothing_behind",
            failed_jail_leaves_nothing,
        ),
    ];
    for (name, test) in tests {
        println!("test {name} ...");
        test();
        println!("test {name} ... ok");
    }
}

fn resources() -> Resources {
    Resources {
        vcpus: 1,
        guest_mem_mib: 32,
        cpu_quota_us: None,
        cpu_period_us: None,
    }
}

/// The helper side. Prints `pid N` (launcher) or `ready ...` (jailed), then obeys stdin.
fn jailed_vmm() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    // An inherited fd the jail must close (no CLOEXEC, as a leak would be).
    // SAFETY: dup of stderr, which is open.
    let leaked = unsafe { libc::dup(2) };
    let mut config = JailConfig::new(
        &var("HUSK_CONFINE_ID"),
        Path::new(&var("HUSK_CONFINE_ROOT")),
        Path::new(&var("HUSK_CONFINE_KERNEL")),
        resources(),
    );
    config.tun = true;
    match Jail::enter(&config) {
        Err(e) => {
            eprintln!("jail: {e}");
            std::process::exit(2);
        }
        Ok(Entered::Parent { child, .. }) => {
            println!("pid {child} leaked {leaked}");
        }
        Ok(Entered::Jailed(jail)) => {
            let kernel_len = std::fs::read(&jail.kernel).map(|b| b.len()).unwrap_or(0);
            let tun_ok = Path::new("/dev/net/tun").exists();
            // SAFETY: open with a NUL-terminated literal path.
            let kvm = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            // SAFETY: KVM_GET_API_VERSION (_IO(0xAE, 0)) takes no argument.
            let api = unsafe { libc::ioctl(kvm, 0xae00, 0) };
            // SAFETY: KVM_CREATE_VM (_IO(0xAE, 1)) takes the machine type, 0.
            let vm = unsafe { libc::ioctl(kvm, 0xae01, 0) };
            if let Err(e) = seccomp::install(ThreadKind::EventLoop, SeccompMode::Kill) {
                println!("seccomp failed: {e}");
                std::process::exit(3);
            }
            println!("ready kvm {kvm} vm {vm} api {api} kernel {kernel_len} tun {tun_ok}");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            if line.trim() == "getcwd" {
                let mut buf = [0u8; 64];
                // SAFETY: getcwd into our stack buffer (outside the filter: kills us).
                unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
            }
            std::process::exit(0);
        }
    }
}

/// Kills and reaps the jailed vmm and removes its jail, also when an assertion fails.
struct Cleanup {
    pid: Option<i32>,
    root: PathBuf,
    id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: signalling our own (adopted) descendant.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaping it; a null status pointer is allowed.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        let _ = Jail::remove(&self.root, Path::new(CGROUP_ROOT), &self.id);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn spawn_helper(root: &Path, id: &str, kernel: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "jailed-vmm")
        .env("HUSK_CONFINE_ROOT", root)
        .env("HUSK_CONFINE_ID", id)
        .env("HUSK_CONFINE_KERNEL", kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-exec the test binary as the jailed vmm")
}

/// Lines from `r`, each within 30 s.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no {what} line from the helper within 30 s: {e}"))
}

fn wait_status(pid: i32, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    let mut status = 0;
    loop {
        // SAFETY: reaping our own (adopted) descendant; `status` is a valid int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} did not end within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn scratch(name: &str) -> (PathBuf, String, PathBuf) {
    let root = PathBuf::from(format!("/tmp/husk-confine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let kernel = root.join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel, but 40 bytes long!!").unwrap();
    (
        root,
        format!("confine-{name}-{}", std::process::id()),
        kernel,
    )
}

fn jailed_vmm_is_confined() {
    let (root, id, kernel) = scratch("ok");
    let mut cleanup = Cleanup {
        pid: None,
        root: root.clone(),
        id: id.clone(),
    };
    let mut helper = spawn_helper(&root, &id, &kernel);
    let out = lines(helper.stdout.take().unwrap());
    let err = lines(helper.stderr.take().unwrap());
    // The launcher's `pid` line and the jailed vmm's `ready` line come in either order.
    let (a, b) = (next(&out, "first"), next(&out, "second"));
    let (first, ready) = if a.starts_with("pid ") {
        (a, b)
    } else {
        (b, a)
    };
    let fields: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        fields.first(),
        Some(&"pid"),
        "helper said {first:?}; stderr: {:?}",
        err.try_recv()
    );
    let pid: i32 = fields[1].parse().unwrap();
    let leaked: i32 = fields[3].parse().unwrap();
    cleanup.pid = Some(pid);
    // Child::wait closes the stdin pipe, which the jailed vmm reads: keep it.
    let mut stdin = helper.stdin.take().unwrap();
    let launcher = helper.wait().unwrap();
    assert!(
        launcher.success(),
        "the launcher exits 0 after reporting: {launcher}"
    );

    let r: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(r.first(), Some(&"ready"), "{ready}");
    let (kvm_fd, vm_fd): (i32, i32) = (r[2].parse().unwrap(), r[4].parse().unwrap());
    assert!(
        kvm_fd >= 0,
        "the jail user could not open /dev/kvm: {ready}"
    );
    assert!(
        vm_fd >= 0,
        "KVM_CREATE_VM failed for the jail user: {ready}"
    );
    assert_eq!(r[6], "12", "KVM API version: {ready}");
    assert_eq!(
        r[8], "40",
        "the kernel must be readable inside the jail: {ready}"
    );
    assert_eq!(r[10], "true", "dev/net/tun must exist: {ready}");

    // Seccomp, capabilities, identity.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    let uid = uid_for(&id).to_string();
    let want_ids = [uid.as_str(); 4].join("\t");
    assert_eq!(status_field(pid, "Uid"), want_ids);
    assert_eq!(status_field(pid, "Gid"), want_ids);
    assert_eq!(status_field(pid, "Groups"), "");
    // PID 1 of its own pid namespace.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));

    // Namespaces differ from ours.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{ns}: {e}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }

    // Its root is the jail: same inode, the kernel is there, the host's /etc is not.
    let jail = root.join(&id).join("jail");
    let their_root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let jail_meta = std::fs::metadata(&jail).unwrap();
    assert_eq!(
        (their_root.dev(), their_root.ino()),
        (jail_meta.dev(), jail_meta.ino())
    );
    assert!(Path::new(&format!("/proc/{pid}/root/vmlinux")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root/tmp")).exists());

    // Only stdio and the two KVM fds it opened itself.
    let fds: BTreeSet<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    assert_eq!(
        fds,
        BTreeSet::from([0, 1, 2, kvm_fd, vm_fd]),
        "leaked fd was {leaked}"
    );

    // Its cgroups, sized with the overhead.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for controller in cgroup::CONTROLLERS {
        assert!(
            cg.lines()
                .any(|l| l.ends_with(&format!(":{controller}:/husk/{id}"))
                    || l.contains(&format!("{controller},"))
                        && l.ends_with(&format!("/husk/{id}"))),
            "{controller} in {cg}"
        );
    }
    let mem_dir = cgroup::cgroup_dir(Path::new(CGROUP_ROOT), "memory", &id);
    let limit = std::fs::read_to_string(mem_dir.join("memory.limit_in_bytes")).unwrap();
    assert_eq!(
        limit.trim(),
        ((32u64 << 20) + cgroup::VMM_MEMORY_OVERHEAD).to_string()
    );

    // A syscall outside the allowlist kills it.
    stdin.write_all(b"getcwd\n").unwrap();
    let status = wait_status(pid, Duration::from_secs(10));
    cleanup.pid = None;
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
        "status {status:#x}: the vmm must die of SIGSYS"
    );

    // Removal leaves nothing.
    Jail::remove(&root, Path::new(CGROUP_ROOT), &id).unwrap();
    assert!(!root.join(&id).exists());
    for controller in cgroup::CONTROLLERS {
        let dir = cgroup::cgroup_dir(Path::new(CGROUP_ROOT), controller, &id);
        assert!(!dir.exists(), "{dir:?} left behind");
    }
}

fn failed_jail_leaves_nothing() {
    let (root, id, _) = scratch("fail");
    let cleanup = Cleanup {
        pid: None,
        root: root.clone(),
        id: id.clone(),
    };
    let missing = root.join("no-such-vmlinux");
    let helper = spawn_helper(&root, &id, &missing);
    let out = helper.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("put the kernel into the jail") && stderr.contains("no-such-vmlinux"),
        "the error must name the step and the file: {stderr}"
    );
    assert!(
        !root.join(&id).exists(),
        "the jail directory was left behind"
    );
    for controller in cgroup::CONTROLLERS {
        assert!(!cgroup::cgroup_dir(Path::new(CGROUP_ROOT), controller, &id).exists());
    }
    drop(cleanup);
}
