//! Full path (issue 4): the real guest kernel boots with the agent as PID 1, the host
//! reaches it over the VMM's vsock device, and containers run inside the VM on a
//! virtio-fs rootfs. One booted guest serves every check (boots cost ~40 s here); each
//! check is a named step, so a failure says which. Run with `flock /tmp/husk-vm.lock`.

mod full_guest_common;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use full_guest_common::{boot, init, read_all, Guest};
use husk_protocol::client::ClientError;
use husk_protocol::framing::{read_frame, write_frame};
use husk_protocol::{AgentError, ExitStatus, Request, Response, CONTROL_PORT, PROTOCOL_VERSION};

#[test]
fn agent_in_a_real_vm_runs_containers_over_vsock() {
    let guest = boot();
    echo_prints_hello_with_first_output_time(&guest);
    version_handshake_over_real_vsock(&guest);
    exit_code_is_reported(&guest);
    stdin_is_relayed(&guest);
    sigkill_is_reported_as_signal_9(&guest);
    guest_death_closes_host_streams(guest);
}

fn echo_prints_hello_with_first_output_time(guest: &Guest) {
    let t0 = Instant::now();
    let spawned = guest.run("echo", &["echo", "hello"], false, false);
    let out = read_all(guest.stream(spawned.stdio.stdout.unwrap()));
    eprintln!(
        "figure: VMM start -> first container output: {} ms (create+start+output: {} ms)",
        guest.vm.started_at().elapsed().as_millis(),
        t0.elapsed().as_millis()
    );
    assert_eq!(out, "hello\n", "console:\n{}", guest.console.text());
    assert_eq!(guest.wait_and_delete("echo"), ExitStatus::Exited(0));
}

fn version_handshake_over_real_vsock(guest: &Guest) {
    // The right version was accepted (every client above did it); a wrong one is refused
    // with a typed error, and the agent keeps serving.
    let mut stream = guest.stream(CONTROL_PORT);
    write_frame(&mut stream, &Request::Hello { version: 999 }).unwrap();
    match read_frame::<_, Response>(&mut stream).unwrap() {
        Response::Error {
            error: AgentError::VersionMismatch { host: 999, agent },
        } => assert_eq!(agent, PROTOCOL_VERSION),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    guest
        .client()
        .ping()
        .expect("agent serves after a refused handshake");
}

fn exit_code_is_reported(guest: &Guest) {
    let (_, err, status) = guest.sh("exit3", "echo oops >&2; exit 3", false);
    assert_eq!(err, "oops\n");
    assert_eq!(status, ExitStatus::Exited(3));
}

fn stdin_is_relayed(guest: &Guest) {
    let spawned = guest.run("cat", &["cat"], true, false);
    let mut stdin = guest.stream(spawned.stdio.stdin.unwrap());
    let stdout = guest.stream(spawned.stdio.stdout.unwrap());
    stdin
        .write_all(b"ping from the host\nsecond line\n")
        .unwrap();
    drop(stdin); // EOF ends cat
    assert_eq!(read_all(stdout), "ping from the host\nsecond line\n");
    assert_eq!(guest.wait_and_delete("cat"), ExitStatus::Exited(0));
}

fn sigkill_is_reported_as_signal_9(guest: &Guest) {
    guest.run("sleep", &["sleep", "1000"], false, false);
    let mut waiter_client = guest.client();
    let waiter = thread::spawn(move || waiter_client.wait_process(init("sleep")));
    thread::sleep(Duration::from_secs(2));
    assert!(!waiter.is_finished(), "sleep 1000 must still be running");
    guest
        .client()
        .signal_process(init("sleep"), libc::SIGKILL)
        .unwrap();
    assert_eq!(
        waiter.join().unwrap().unwrap(),
        ExitStatus::Signaled(libc::SIGKILL)
    );
    guest.client().delete_container("sleep", true).unwrap();
}

/// A guest that goes away must close the host ends of its vsock streams: a pending
/// WaitProcess gets an error, never a hang.
fn guest_death_closes_host_streams(guest: Guest) {
    guest.run("forever", &["sleep", "1000"], false, false);
    let mut waiter_client = guest.client();
    let waiter = thread::spawn(move || waiter_client.wait_process(init("forever")));
    thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let outcome = guest.vm.kill().expect("stop the VM");
    eprintln!(
        "VM stopped ({:?}) in {} ms",
        outcome.exit,
        t0.elapsed().as_millis()
    );
    let result = waiter.join().unwrap();
    assert!(
        matches!(result, Err(ClientError::Frame(_))),
        "a wait on a dead guest must fail, got {result:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the waiter must see the guest's death promptly"
    );
    assert!(
        !guest.dir.path().join("vsock.sock").exists(),
        "the vsock socket is removed with the VM"
    );
}
