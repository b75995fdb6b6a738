//! Tier 3, full path: a container in a real microVM, driven through the `husk` CLI with
//! `--isolation vm` in Docker's call sequence (create, start, delete), attached to a
//! network namespace the test made: namespaces A and B joined by a veth pair
//! (10.200.0.1/24 on vA, MTU 1400, default route via B; 10.200.0.2/24 on vB). The
//! container's script reports its interface, then exchanges 1 MiB with a busybox `nc`
//! in B each way. One guest boot serves every step.
//!
//! Needs root, /dev/kvm and `scripts/setup.sh` (kernel with virtio-net, initramfs,
//! virtiofsd, binaries); holds `/tmp/husk-vm.lock`.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use husk::net::TAP_NAME;
use husk_tests::cli::{bundle, edit_config, wait_child, Guest, Husk};
use husk_tests::netns::{pair, Ns};
use husk_tests::vm_lock;
use serde_json::json;

/// Boot plus container creation, with room for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Each step runs a few busybox processes in the guest: seconds each on PVM hosts.
const STEP_TIMEOUT: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;

/// The container's side of every step; its output is the daemon's stdout.
const SCRIPT: &str = "\
ifconfig vA; ip route; echo IFACE-END
read r < /etc/resolv.conf; echo \"resolv: $r\"
read h < /etc/hosts; echo \"hosts: $h\"
dd if=/dev/zero bs=64k count=16 2>/dev/null | nc 10.200.0.2 5001; echo \"sent: $?\"
nc -l -p 5002 | wc -c | sed 's/^ */received: /'
echo done";

fn step(name: &str) {
    eprintln!("--- step: {name}");
}

/// Waits until `file` contains `marker`; its text.
fn wait_for(file: &Path, marker: &str, timeout: Duration, daemon_log: &Path) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "no {marker:?} within {timeout:?}; container output so far:\n{text}\ndaemon log:\n{}",
            std::fs::read_to_string(daemon_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `busybox nc` in `ns` with a stdin that stays open (busybox nc quits at the end of
/// its stdin, even while data still comes in).
fn nc_in(ns: &Ns, args: &[&str], stdout: File) -> Child {
    ns.command("busybox")
        .arg("nc")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn container_in_a_vm_talks_to_a_peer_namespace_with_its_engine_address() {
    let _vm = vm_lock::hold();
    let (a, b) = pair("fnv");
    let mac_a = a.mac("vA");
    let mac_text = mac_a
        .iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":");

    let mut husk = Husk::new(Guest::MicroVm);
    let bundle = bundle(SCRIPT);
    let files = tempfile::tempdir().unwrap();
    let (resolv, hosts) = (files.path().join("resolv"), files.path().join("hosts"));
    std::fs::write(&resolv, "nameserver 10.200.0.53\n").unwrap();
    std::fs::write(&hosts, "10.200.0.2 peer\n").unwrap();
    // As in an image: the mount points exist in the (read-only) root.
    for f in ["hosts", "resolv.conf"] {
        std::fs::write(bundle.path().join("rootfs/etc").join(f), "").unwrap();
    }
    edit_config(bundle.path(), |config| {
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|ns| ns["type"] != "network");
        namespaces.push(json!({"type": "network", "path": a.path()}));
        let mounts = config["mounts"].as_array_mut().unwrap();
        for (dest, src) in [("/etc/resolv.conf", &resolv), ("/etc/hosts", &hosts)] {
            mounts.push(json!({"destination": dest, "type": "bind", "source": src,
                               "options": ["rbind", "ro"]}));
        }
    });

    let out_dir = tempfile::tempdir().unwrap();
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let from_guest = out_dir.path().join("from-guest");
    let mut listener = nc_in(
        &b,
        &["-l", "-p", "5001"],
        File::create(&from_guest).unwrap(),
    );

    step("create attaches to the namespace and boots the guest");
    let id = "netvm";
    let args = ["create", "-b", bundle.path().to_str().unwrap(), id];
    husk.track(&args);
    let started = Instant::now();
    // The daemon keeps create's stdio: its stdin (a pipe held open) and stdout (a file).
    let mut create = husk
        .command(&args)
        .stdin(Stdio::piped())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let _daemon_stdin = create.stdin.take();
    let code = wait_child(&mut create, BOOT_TIMEOUT);
    assert_eq!(
        code,
        Some(0),
        "create: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    eprintln!("created in {:?}", started.elapsed());
    let filters = a.tc(&["filter", "show", "dev", "vA", "ingress"]);
    assert!(
        filters.contains(TAP_NAME),
        "no redirect to the tap: {filters}"
    );
    husk.must(&["start", id], STEP_TIMEOUT);
    let daemon_log = husk.root().join(id).join("daemon.log");

    step("the guest interface has the namespace's IP, MAC, MTU and route");
    let text = wait_for(&out, "IFACE-END", STEP_TIMEOUT, &daemon_log);
    let upper = text.to_uppercase();
    assert!(upper.contains(&format!("HWADDR {mac_text}")), "{text}");
    assert!(text.contains("inet addr:10.200.0.1"), "{text}");
    assert!(text.contains("Mask:255.255.255.0"), "{text}");
    assert!(text.contains("MTU:1400"), "{text}");
    assert!(text.contains("default via 10.200.0.2 dev vA"), "{text}");

    step("/etc/resolv.conf and /etc/hosts come from the bundle's bind mounts");
    let text = wait_for(&out, "hosts:", STEP_TIMEOUT, &daemon_log);
    assert!(text.contains("resolv: nameserver 10.200.0.53"), "{text}");
    assert!(text.contains("hosts: 10.200.0.2 peer"), "{text}");

    step("container -> peer: 1 MiB to nc listening in B");
    let text = wait_for(&out, "sent:", STEP_TIMEOUT, &daemon_log);
    assert!(text.contains("sent: 0"), "{text}");
    assert!(
        wait_child(&mut listener, STEP_TIMEOUT).is_some(),
        "the listener in B did not see the end of the stream"
    );
    let got = std::fs::metadata(&from_guest).unwrap().len() as usize;
    assert_eq!(got, MIB, "bytes B received from the container");

    step("peer -> container: 1 MiB from B to nc listening in the container");
    let payload = out_dir.path().join("payload");
    std::fs::write(&payload, vec![b'x'; MIB]).unwrap();
    let start = Instant::now();
    // Until the container listens, B's connection is refused: retry.
    loop {
        let sent = b
            .command("busybox")
            .args(["nc", "10.200.0.1", "5002"])
            .stdin(File::open(&payload).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if sent.success() {
            break;
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "the container never listened"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = wait_for(&out, "done", STEP_TIMEOUT, &daemon_log);
    assert!(text.contains(&format!("received: {MIB}")), "{text}");

    step("delete removes the tap and the filters");
    husk.wait_status(id, "stopped", STEP_TIMEOUT);
    husk.must(&["delete", id], STEP_TIMEOUT);
    // No ingress qdisc means no filter: they live in it.
    a.assert_clean("vA");
    assert!(
        a.ip_ok(&["link", "show", "dev", "vA"]),
        "vA is the engine's"
    );
    husk.assert_nothing_left();
}
