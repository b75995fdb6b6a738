//! Tier 2: the real `husk-agent` binary on the host, over Unix sockets in a temporary
//! directory, running containers from a busybox bundle with libcontainer.
//!
//! Needs root (namespaces, cgroups, mounts) and Debian's busybox-static at /bin/busybox.
//! Each test starts its own agent and shuts it down at the end, which force-deletes its
//! containers (processes, cgroups); container mounts live in their own mount namespaces.

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use husk_protocol::client::{AgentClient, ClientError, Spawned};
use husk_protocol::connector::{Connector, UnixDirConnector};
use husk_protocol::framing::{read_frame, write_frame};
use husk_protocol::messages::{ProcessRef, StdioRequest};
use husk_protocol::{AgentError, ExitStatus, Request, Response, CONTROL_PORT};
use oci_spec::runtime::{Process, ProcessBuilder, Spec};
use sha2::{Digest, Sha256};

const BUSYBOX: &str = "/bin/busybox";

/// One agent process on the host, with its socket directory and a busybox rootfs.
struct HostAgent {
    dir: tempfile::TempDir,
    child: Child,
    connector: UnixDirConnector,
}

impl HostAgent {
    fn start() -> HostAgent {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "agent_host tests need root (namespaces, cgroups): run them as root"
        );
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing: apt-get install busybox-static"
        );
        let dir = tempfile::tempdir().unwrap();
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).unwrap();
        let child = Command::new(agent_binary())
            .arg("--unix-dir")
            .arg(&sockets)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting husk-agent");
        make_busybox_rootfs(&dir.path().join("rootfs"));
        let connector = UnixDirConnector::new(&sockets);
        let deadline = Instant::now() + Duration::from_secs(20);
        while connector.connect(CONTROL_PORT).is_err() {
            assert!(
                Instant::now() < deadline,
                "husk-agent did not listen within 20 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        HostAgent {
            dir,
            child,
            connector,
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::connect(&self.connector).expect("connecting to the agent")
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Creates and starts a container running `args`; returns its init's ports.
    fn run(&self, id: &str, args: &[&str], stdin: bool) -> Spawned {
        let mut client = self.client();
        let spawned = client
            .create_container(id, spec(args), self.rootfs(), StdioRequest { stdin })
            .expect("create");
        client.start_container(id).expect("start");
        spawned
    }

    fn connect(&self, port: Option<u32>) -> UnixStream {
        self.connector
            .connect(port.expect("the agent gave no port for this stream"))
            .unwrap()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        // Shutdown force-deletes every container; then the agent exits.
        if let Ok(mut client) = AgentClient::connect(&self.connector) {
            let _ = client.shutdown();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                _ if Instant::now() > deadline => break,
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent binary built from this workspace (or `HUSK_AGENT_BIN`).
fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("HUSK_AGENT_BIN") {
        return bin.into();
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "husk-agent"])
        .status()
        .expect("running cargo build -p husk-agent");
    assert!(status.success(), "cargo build -p husk-agent failed");
    // This test runs from target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("husk-agent");
    assert!(bin.exists(), "{} not found after building", bin.display());
    bin
}

/// A rootfs with busybox and a link per applet, as `busybox --install -s` would make.
fn make_busybox_rootfs(root: &Path) {
    for dir in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
}

fn process(args: &[&str]) -> Process {
    ProcessBuilder::default()
        .args(args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .terminal(false)
        .build()
        .unwrap()
}

/// oci-spec's default spec (namespaces, masked and read-only paths, default mounts,
/// capabilities) running `args`.
fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    spec.set_process(Some(process(args)));
    spec
}

fn unique_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn init(id: &str) -> ProcessRef {
    ProcessRef {
        container_id: id.to_owned(),
        exec_id: None,
    }
}

fn read_all(mut stream: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn echo_prints_hello_and_exits_zero() {
    let agent = HostAgent::start();
    let id = unique_id("echo");
    let spawned = agent.run(&id, &["echo", "hello"], false);
    assert!(spawned.stdio.stdin.is_none(), "no stdin was asked for");
    let stdout = agent.connect(spawned.stdio.stdout);
    let stderr = agent.connect(spawned.stdio.stderr);
    assert_eq!(String::from_utf8(read_all(stdout)).unwrap(), "hello\n");
    assert_eq!(read_all(stderr), b"");
    let mut client = agent.client();
    assert_eq!(
        client.wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
    client.delete_container(&id, false).unwrap();
}

#[test]
fn exit_code_is_reported() {
    let agent = HostAgent::start();
    let id = unique_id("exit3");
    let spawned = agent.run(&id, &["sh", "-c", "echo oops >&2; exit 3"], false);
    let stderr = agent.connect(spawned.stdio.stderr);
    assert_eq!(read_all(stderr), b"oops\n");
    let mut client = agent.client();
    assert_eq!(
        client.wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(3)
    );
}

#[test]
fn sigkill_is_delivered_and_reported() {
    let agent = HostAgent::start();
    let id = unique_id("sleep");
    agent.run(&id, &["sleep", "1000"], false);
    let waiter = {
        let mut client = agent.client();
        let id = id.clone();
        thread::spawn(move || client.wait_process(init(&id)))
    };
    thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "sleep 1000 must still be running");
    agent
        .client()
        .signal_process(init(&id), libc::SIGKILL)
        .unwrap();
    assert_eq!(
        waiter.join().unwrap().unwrap(),
        ExitStatus::Signaled(libc::SIGKILL)
    );
}

#[test]
fn stdin_is_relayed_and_eof_ends_it() {
    let agent = HostAgent::start();
    let id = unique_id("cat");
    let spawned = agent.run(&id, &["cat"], true);
    let mut stdin = agent.connect(spawned.stdio.stdin);
    let stdout = agent.connect(spawned.stdio.stdout);
    stdin
        .write_all(b"ping from the host\nsecond line\n")
        .unwrap();
    drop(stdin); // end of file: cat exits
    assert_eq!(read_all(stdout), b"ping from the host\nsecond line\n");
    assert_eq!(
        agent.client().wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
}

#[test]
fn ten_mib_through_cat_arrive_intact() {
    const LEN: usize = 10 << 20;
    let agent = HostAgent::start();
    let id = unique_id("bulk");
    let spawned = agent.run(&id, &["cat"], true);
    let mut stdin = agent.connect(spawned.stdio.stdin);
    let stdout = agent.connect(spawned.stdio.stdout);
    // A pattern that is not periodic in any small period, so shifts and drops show up.
    let mut data = Vec::with_capacity(LEN);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let sent = Sha256::digest(&data);
    let writer = thread::spawn(move || {
        stdin.write_all(&data).unwrap();
    });
    let received = read_all(stdout);
    writer.join().unwrap();
    assert_eq!(received.len(), LEN);
    assert_eq!(Sha256::digest(&received), sent, "10 MiB came back changed");
    assert_eq!(
        agent.client().wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
}

#[test]
fn ten_concurrent_execs_in_one_container() {
    let agent = HostAgent::start();
    let id = unique_id("execs");
    agent.run(&id, &["sleep", "1000"], false);
    let results: Vec<(String, ExitStatus)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|n| {
                let agent = &agent;
                let id = &id;
                scope.spawn(move || {
                    let mut client = agent.client();
                    let exec_id = format!("exec{n}");
                    let script = format!("echo exec-{n}; exit {n}");
                    let spawned = client
                        .exec_process(
                            id,
                            &exec_id,
                            process(&["sh", "-c", &script]),
                            StdioRequest::default(),
                        )
                        .unwrap();
                    let stdout = agent.connect(spawned.stdio.stdout);
                    let _stderr = agent.connect(spawned.stdio.stderr);
                    let out = String::from_utf8(read_all(stdout)).unwrap();
                    let process = ProcessRef {
                        container_id: id.clone(),
                        exec_id: Some(exec_id),
                    };
                    (out, client.wait_process(process).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, (out, status)) in results.into_iter().enumerate() {
        assert_eq!(out, format!("exec-{n}\n"));
        assert_eq!(status, ExitStatus::Exited(n as i32));
    }
    let mut client = agent.client();
    client.signal_process(init(&id), libc::SIGKILL).unwrap();
    assert_eq!(
        client.wait_process(init(&id)).unwrap(),
        ExitStatus::Signaled(libc::SIGKILL)
    );
    client.delete_container(&id, false).unwrap();
}

#[test]
fn bad_spec_is_a_typed_error() {
    let agent = HostAgent::start();
    let mut client = agent.client();
    let id = unique_id("bad");
    let mut no_args = Spec::default();
    no_args.set_process(Some(process(&[])));
    match client.create_container(&id, no_args, agent.rootfs(), StdioRequest::default()) {
        Err(ClientError::Agent(AgentError::InvalidSpec { reason })) => {
            assert!(reason.contains("process.args"), "{reason}")
        }
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    match client.create_container(
        &id,
        spec(&["true"]),
        "/does/not/exist",
        StdioRequest::default(),
    ) {
        Err(ClientError::Agent(AgentError::InvalidSpec { reason })) => {
            assert!(reason.contains("/does/not/exist"), "{reason}")
        }
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    // The failed creates left nothing behind: the id is free.
    let spawned = agent.run(&id, &["true"], false);
    drop(agent.connect(spawned.stdio.stdout));
    assert_eq!(
        client.wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
}

#[test]
fn unknown_container_is_a_typed_error() {
    let agent = HostAgent::start();
    let mut client = agent.client();
    let not_found = |r: Result<_, ClientError>| match r {
        Err(ClientError::Agent(AgentError::ContainerNotFound { id })) => assert_eq!(id, "ghost"),
        other => panic!("expected ContainerNotFound, got {other:?}"),
    };
    not_found(client.start_container("ghost"));
    not_found(client.wait_process(init("ghost")).map(|_| ()));
    not_found(client.signal_process(init("ghost"), 15));
    not_found(client.delete_container("ghost", true));
}

#[test]
fn version_mismatch_is_refused_by_the_real_agent() {
    let agent = HostAgent::start();
    let mut stream = agent.connector.connect(CONTROL_PORT).unwrap();
    write_frame(&mut stream, &Request::Hello { version: 999 }).unwrap();
    let reply: Response = read_frame(&mut stream).unwrap();
    match reply {
        Response::Error {
            error: AgentError::VersionMismatch { host: 999, agent },
        } => {
            assert_eq!(agent, husk_protocol::PROTOCOL_VERSION)
        }
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    // The agent is unharmed and serves the next connection.
    agent.client().ping().unwrap();
}

#[test]
fn terminal_process_gets_a_pty_with_the_size_we_set() {
    let agent = HostAgent::start();
    let id = unique_id("tty");
    let mut client = agent.client();
    let mut spec = spec(&["sh", "-c", "read line; echo \"got $line\"; stty size; tty"]);
    spec.process_mut()
        .as_mut()
        .unwrap()
        .set_terminal(Some(true));
    let spawned = client
        .create_container(&id, spec, agent.rootfs(), StdioRequest::default())
        .unwrap();
    assert!(
        spawned.stdio.stdout.is_none() && spawned.stdio.stderr.is_none(),
        "a pty replaces the pipes"
    );
    let mut pty = agent.connect(spawned.stdio.pty);
    client.resize_pty(init(&id), 33, 77).unwrap();
    client.start_container(&id).unwrap();
    pty.write_all(b"hi\n").unwrap();
    let out = String::from_utf8_lossy(&read_all(pty)).into_owned();
    assert!(out.contains("got hi\r\n"), "{out:?}");
    assert!(out.contains("33 77\r\n"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert_eq!(
        client.wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
}

#[test]
fn resizing_a_process_without_terminal_is_a_typed_error() {
    let agent = HostAgent::start();
    let id = unique_id("notty");
    agent.run(&id, &["sleep", "1000"], false);
    match agent.client().resize_pty(init(&id), 10, 10) {
        Err(ClientError::Agent(AgentError::InvalidRequest { reason })) => {
            assert!(reason.contains("no terminal"), "{reason}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn stats_report_the_container_cgroup() {
    let agent = HostAgent::start();
    let id = unique_id("stats");
    agent.run(&id, &["sleep", "1000"], false);
    let stats = agent.client().stats(&id).unwrap();
    let pids = stats["pids"]["current"].as_u64();
    assert_eq!(pids, Some(1), "one process (sleep) in the cgroup: {stats}");
}

#[test]
fn processes_are_listed_signalled_all_and_limited_by_update() {
    let agent = HostAgent::start();
    let id = unique_id("all");
    // The init (sleep) is PID 1 of the container's pid namespace and has no USR1
    // handler, so USR1 does not reach it; --all must still reach the two exec'd sleeps,
    // which USR1 ends.
    let init_pid = agent.run(&id, &["sleep", "1000"], false).pid;
    for exec_id in ["e1", "e2"] {
        agent
            .client()
            .exec_process(
                &id,
                exec_id,
                process(&["sleep", "1000"]),
                StdioRequest { stdin: false },
            )
            .unwrap();
    }
    let mut client = agent.client();
    let pids = client.list_processes(&id).unwrap();
    assert_eq!(pids.len(), 3, "the init and two execs: {pids:?}");
    assert!(
        pids.contains(&init_pid),
        "{pids:?} lacks the init {init_pid}"
    );
    assert!(pids.windows(2).all(|w| w[0] < w[1]), "sorted: {pids:?}");

    // update: the new pids limit reaches the container's cgroup.
    let mut resources = oci_spec::runtime::LinuxResources::default();
    resources.set_pids(Some(
        oci_spec::runtime::LinuxPidsBuilder::default()
            .limit(42)
            .build()
            .unwrap(),
    ));
    client.update_container(&id, resources).unwrap();
    let stats = client.stats(&id).unwrap();
    assert_eq!(stats["pids"]["limit"].as_u64(), Some(42), "{stats}");

    // kill --all with USR1: the execs die, the init stays.
    client.signal_container(&id, libc::SIGUSR1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = client.list_processes(&id).unwrap();
        if left == [init_pid] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only the init should survive USR1 to all: {left:?} of {pids:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    match client.signal_container(&id, 12345) {
        Err(ClientError::Agent(AgentError::InvalidRequest { .. })) => {}
        other => panic!("a bad signal number must be refused, got {other:?}"),
    }
    match client.list_processes("ghost") {
        Err(ClientError::Agent(AgentError::ContainerNotFound { .. })) => {}
        other => panic!("an unknown container must be named, got {other:?}"),
    }
}

/// The agent (a Rust program) ignores SIGPIPE, and whoever started it may ignore or block
/// more; the workload must start clean, as under runc.
#[test]
fn the_workload_starts_with_default_signal_dispositions() {
    let agent = HostAgent::start();
    let id = unique_id("signals");
    // grep itself, not through a shell: busybox sh ignores SIGQUIT on its own.
    let spawned = agent.run(
        &id,
        &["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
        false,
    );
    let out = String::from_utf8(read_all(agent.connect(spawned.stdio.stdout))).unwrap();
    // Signals 1..=31; the C library's own real-time signals (32, 33) cannot be reset.
    let standard = (1u64 << 31) - 1;
    for line in out.lines() {
        let (name, mask) = line.split_once(':').unwrap();
        let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
        assert_eq!(mask & standard, 0, "{name} in the workload: {out}");
    }
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(
        agent.client().wait_process(init(&id)).unwrap(),
        ExitStatus::Exited(0)
    );
}
