//! The filters compile and say why each rule is there; installed in a forked child they
//! kill on a call outside the list, let listed calls through, and only log in log mode.

use std::time::{Duration, Instant};

use seccompiler::BpfProgram;

use super::*;

#[test]
fn every_thread_kind_has_a_kill_and_a_log_program() {
    for kind in ThreadKind::ALL {
        let kill = bpf(kind, SeccompMode::Kill).unwrap();
        let log = bpf(kind, SeccompMode::Log).unwrap();
        // At least one compare-and-jump per rule plus the arch check and the returns.
        assert!(
            kill.len() > rule_count(kind),
            "{kind}: {} insns",
            kill.len()
        );
        assert_eq!(
            kill.len(),
            log.len(),
            "{kind}: only the default action differs"
        );
        assert_ne!(
            kill, log,
            "{kind}: the log program must differ from the kill one"
        );
        assert!(bpf(kind, SeccompMode::Off).is_none());
        let names = syscalls(kind);
        assert!(names.contains(&"futex".to_string()), "{kind}: {names:?}");
        assert!(!names.contains(&"execve".to_string()), "{kind}: {names:?}");
        assert!(!names.contains(&"openat".to_string()), "{kind}: {names:?}");
    }
    // Only the vCPU thread runs the guest; only the others accept connections.
    assert!(!syscalls(ThreadKind::Vcpu).contains(&"accept4".to_string()));
    assert!(syscalls(ThreadKind::EventLoop).contains(&"accept4".to_string()));
}

#[test]
fn modes_parse_and_log_and_off_are_refused_in_release_builds() {
    assert_eq!(
        SeccompMode::parse("kill", false).unwrap(),
        SeccompMode::Kill
    );
    assert_eq!(SeccompMode::parse("log", true).unwrap(), SeccompMode::Log);
    assert_eq!(SeccompMode::parse("off", true).unwrap(), SeccompMode::Off);
    let e = SeccompMode::parse("off", false).unwrap_err();
    assert!(e.to_string().contains("development builds only"), "{e}");
    let e = SeccompMode::parse("permissive", true).unwrap_err();
    assert!(e.to_string().contains("\"permissive\""), "{e}");
}

const GOOD: &str = r#"{"t": {"default_action": "kill_process", "filter_action": "allow",
    "filter": [{"syscall": "read", "comment": "why"},
               {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq",
                 "val": 1, "comment": "X"}], "comment": "why"}]}}"#;

#[test]
fn policy_accepts_commented_rules_and_names_what_is_wrong_otherwise() {
    let s = policy::check("t.json", "t", GOOD).unwrap();
    assert_eq!(s.rules, 2);
    assert_eq!(s.syscalls, vec!["ioctl", "read"]);

    let no_comment = GOOD.replacen(r#", "comment": "why"}"#, "}", 1);
    let e = policy::check("t.json", "t", &no_comment).unwrap_err();
    assert!(
        matches!(e, policy::PolicyError::RuleComment { index: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("t.json: rule 0 (read)"), "{e}");

    let no_arg_comment = GOOD.replace(r#", "comment": "X""#, "");
    let e = policy::check("t.json", "t", &no_arg_comment).unwrap_err();
    assert!(
        matches!(e, policy::PolicyError::ArgComment { index: 1, .. }),
        "{e}"
    );

    let allow_default = GOOD.replace(r#""kill_process""#, r#""allow""#);
    let e = policy::check("t.json", "t", &allow_default).unwrap_err();
    assert!(e.to_string().contains("not \"allow\""), "{e}");

    let e = policy::check("t.json", "other", GOOD).unwrap_err();
    assert!(matches!(e, policy::PolicyError::Shape { .. }), "{e}");
    let e = policy::check("t.json", "t", "{").unwrap_err();
    assert!(matches!(e, policy::PolicyError::Json { .. }), "{e}");

    let log = policy::with_log_default("t", GOOD).unwrap();
    assert!(log.contains(r#""default_action":"log""#), "{log}");
    // The log variant is only for build.rs: the checker refuses it as a source file.
    assert!(policy::check("t.json", "t", &log).is_err());
}

fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// The ioctl numbers in vcpu.json are the ones kvm-bindings' structures give.
#[test]
fn vcpu_ioctl_numbers_match_the_kvm_structures() {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("../../seccomp/vcpu.json")).unwrap();
    let mut found = std::collections::HashMap::new();
    for rule in json["vcpu"]["filter"].as_array().unwrap() {
        if rule["syscall"] == "ioctl" {
            let arg = &rule["args"][0];
            found.insert(
                arg["comment"].as_str().unwrap().to_string(),
                arg["val"].as_u64().unwrap(),
            );
        }
    }
    let expect = [
        ("KVM_RUN", ioc(0, 0x80, 0)),
        (
            "KVM_GET_REGS",
            ioc(2, 0x81, size_of::<kvm_bindings::kvm_regs>()),
        ),
        (
            "KVM_GET_SREGS",
            ioc(2, 0x83, size_of::<kvm_bindings::kvm_sregs>()),
        ),
        (
            "KVM_TRANSLATE",
            ioc(3, 0x85, size_of::<kvm_bindings::kvm_translation>()),
        ),
    ];
    for (name, value) in expect {
        assert_eq!(found.get(name), Some(&value), "{name}: {found:?}");
    }
}

/// How a forked child ended and what it wrote to the pipe.
struct ChildEnd {
    status: libc::c_int,
    output: Vec<u8>,
}

impl ChildEnd {
    fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }
    fn exit_code(&self) -> Option<i32> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }
}

/// Forks; the child installs `program`, runs `body` with the pipe's write end and ends
/// with the raw `exit` syscall (every filter allows it; `exit_group` is not on the vCPU
/// list). Only async-signal-safe calls happen in the child: the program is built before
/// the fork and `body` makes raw syscalls.
fn in_child(program: Option<&BpfProgram>, body: fn(libc::c_int)) -> ChildEnd {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only makes raw syscalls (no allocation, no locks) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        if let Some(p) = program {
            if seccompiler::apply_filter(p).is_err() {
                // SAFETY: ends only this child process.
                unsafe { libc::syscall(libc::SYS_exit, 99) };
            }
        }
        body(fds[1]);
        // SAFETY: ends only this (single-threaded) child process.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!();
    }
    // SAFETY: closing the parent's copy of the write end, which it owns.
    unsafe { libc::close(fds[1]) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    loop {
        // SAFETY: reaping our own child; `status` is a valid int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: killing our own child so the test does not hang.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaping it; `status` is a valid int.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("the child did not end within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut output = vec![0u8; 4096];
    // SAFETY: reading into our own buffer from the pipe's read end, which we own.
    let n = unsafe { libc::read(fds[0], output.as_mut_ptr().cast(), output.len()) };
    output.truncate(n.max(0) as usize);
    // SAFETY: closing the read end, which we own.
    unsafe { libc::close(fds[0]) };
    ChildEnd { status, output }
}

fn write_ok(fd: libc::c_int) {
    // SAFETY: writing a static buffer to the pipe.
    unsafe { libc::write(fd, b"ok".as_ptr().cast(), 2) };
}

fn getcwd_then_write(fd: libc::c_int) {
    let mut buf = [0u8; 256];
    // SAFETY: getcwd fills at most buf.len() bytes of our stack buffer.
    let n = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
    if n > 0 {
        // SAFETY: writing the bytes getcwd returned (n includes the NUL).
        unsafe { libc::write(fd, buf.as_ptr().cast(), (n - 1) as usize) };
    }
}

fn socket_inet(_: libc::c_int) {
    // SAFETY: a plain socket(2) call; the fd leaks into the exiting child.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn socket_unix_then_write(fd: libc::c_int) {
    // SAFETY: a plain socket(2) call; the fd leaks into the exiting child.
    let s = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if s >= 0 {
        write_ok(fd);
    }
}

#[test]
fn vcpu_filter_allows_listed_calls() {
    let end = in_child(bpf(ThreadKind::Vcpu, SeccompMode::Kill).as_ref(), write_ok);
    assert_eq!(end.exit_code(), Some(0), "status {:#x}", end.status);
    assert_eq!(end.output, b"ok");
}

#[test]
fn vcpu_filter_kills_the_process_on_a_call_outside_it() {
    let end = in_child(
        bpf(ThreadKind::Vcpu, SeccompMode::Kill).as_ref(),
        getcwd_then_write,
    );
    assert_eq!(end.signal(), Some(libc::SIGSYS), "status {:#x}", end.status);
    assert!(end.output.is_empty(), "getcwd must not have run");
}

#[test]
fn log_mode_lets_the_call_through() {
    let end = in_child(
        bpf(ThreadKind::Vcpu, SeccompMode::Log).as_ref(),
        getcwd_then_write,
    );
    assert_eq!(end.exit_code(), Some(0), "status {:#x}", end.status);
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(end.output, cwd.as_os_str().as_encoded_bytes());
}

#[test]
fn socket_is_allowed_for_unix_only_on_the_event_loop_and_control_threads() {
    for kind in [ThreadKind::EventLoop, ThreadKind::Control] {
        let program = bpf(kind, SeccompMode::Kill);
        let end = in_child(program.as_ref(), socket_unix_then_write);
        assert_eq!(end.exit_code(), Some(0), "{kind}: status {:#x}", end.status);
        assert_eq!(end.output, b"ok", "{kind}");
        let end = in_child(program.as_ref(), socket_inet);
        assert_eq!(
            end.signal(),
            Some(libc::SIGSYS),
            "{kind}: status {:#x}",
            end.status
        );
    }
    // The vCPU thread may not create sockets at all.
    let end = in_child(
        bpf(ThreadKind::Vcpu, SeccompMode::Kill).as_ref(),
        socket_unix_then_write,
    );
    assert_eq!(end.signal(), Some(libc::SIGSYS));
}

#[test]
fn install_configured_does_nothing_in_a_process_that_was_not_confined() {
    // Unit tests never call confine_process (it is process-wide: the VMM threads of
    // other tests would pick it up), so this thread must stay unfiltered.
    assert_eq!(super::process_mode(), None);
    super::install_configured(ThreadKind::Vcpu).unwrap();
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
}

#[test]
fn each_thread_kind_keeps_its_own_boundaries() {
    let has = |kind: ThreadKind, name: &str| syscalls(kind).iter().any(|s| s == name);
    // Only the event loop and control threads reach host sockets by name.
    for call in ["socket", "connect", "accept4"] {
        assert!(!has(ThreadKind::Vcpu, call), "vcpu allows {call}");
        assert!(
            has(ThreadKind::EventLoop, call) && has(ThreadKind::Control, call),
            "{call}"
        );
    }
    // Only the event loop tears the VM down (virtiofsd) and may signal vCPU threads.
    for call in ["wait4", "kill", "tgkill", "unlink"] {
        assert!(has(ThreadKind::EventLoop, call), "event_loop lacks {call}");
        assert!(
            !has(ThreadKind::Vcpu, call) && !has(ThreadKind::Control, call),
            "{call}"
        );
    }
    // Only the control thread reads the KVM stats fds.
    assert!(has(ThreadKind::Control, "pread64") && !has(ThreadKind::Vcpu, "pread64"));
    for kind in ThreadKind::ALL {
        for call in [
            "execve", "execveat", "openat", "open", "mount", "ptrace", "bpf", "fork", "vfork",
        ] {
            assert!(!has(kind, call), "{kind} allows {call}");
        }
    }
}
