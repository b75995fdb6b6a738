//! The VM sandbox's network on the host, without booting a guest: `husk create
//! --isolation vm` attaches to the spec's network namespace before the VM starts, so
//! its errors show in seconds; and `husk delete`'s cleanup of what a daemon left.
//! Namespaces and addresses are the test's own.

use std::time::Duration;

use husk::net::guest::{cleanup, AttachRecord};
use husk::net::{NetnsAttachment, TAP_NAME};
use husk_tests::cli::{bundle, edit_config, Guest, Husk};
use husk_tests::netns::{occupy_tap_name, pair};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A `true` bundle whose network namespace is `path`.
fn bundle_in(path: &str) -> tempfile::TempDir {
    let dir = bundle("true");
    edit_config(dir.path(), |config| {
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|ns| ns["type"] != "network");
        namespaces.push(json!({"type": "network", "path": path}));
    });
    dir
}

fn create_fails(husk: &mut Husk, bundle: &tempfile::TempDir, id: &str) -> String {
    let dir = bundle.path().to_str().unwrap();
    let out = husk.run_for(&["create", "-b", dir, id], TIMEOUT);
    assert_ne!(out.code, Some(0), "create succeeded: {out:?}");
    out.stderr
}

#[test]
fn a_missing_network_namespace_fails_create_naming_it() {
    let mut husk = Husk::new(Guest::MicroVm);
    let path = format!("/run/netns/husk-no-such-ns-{}", std::process::id());
    let b = bundle_in(&path);
    let err = create_fails(&mut husk, &b, "net-missing");
    assert!(err.contains(&path), "the error must name the path: {err}");
    assert!(err.contains("does not exist"), "{err}");
    husk.assert_nothing_left();
}

#[test]
fn a_tap_that_cannot_be_created_fails_create_and_leaves_no_filter() {
    let (a, b) = pair("vmtap");
    // Someone else's interface has the tap's name.
    occupy_tap_name(&a, &b);
    let mut husk = Husk::new(Guest::MicroVm);
    let bundle = bundle_in(a.path().to_str().unwrap());
    let err = create_fails(&mut husk, &bundle, "net-busy");
    assert!(err.contains(TAP_NAME), "the error must name the tap: {err}");
    let qdiscs = a.tc(&["qdisc", "show", "dev", "vA"]);
    assert!(!qdiscs.contains("ingress"), "filter left on vA: {qdiscs}");
    assert!(a.ip_ok(&["link", "show", "dev", TAP_NAME]), "not ours");
    husk.assert_nothing_left();
}

#[test]
fn delete_removes_what_a_dead_daemon_left() {
    let (a, _b) = pair("vmrec");
    let run_dir = tempfile::tempdir().unwrap();
    let name_files = run_dir.path().join("etc");
    std::fs::create_dir(&name_files).unwrap();
    std::fs::write(name_files.join("hosts"), "x").unwrap();
    let mut att = NetnsAttachment::create(&a.path()).unwrap();
    AttachRecord {
        netns: a.path(),
        interface: att.interface().name.clone(),
    }
    .write(run_dir.path())
    .unwrap();
    // The daemon died: its tap fd closed (the tap goes with it), the redirects stay.
    drop(att.take_tap());
    drop(att);
    let qdiscs = a.tc(&["qdisc", "show", "dev", "vA"]);
    assert!(qdiscs.contains("ingress"), "{qdiscs}");
    cleanup(run_dir.path(), &name_files).unwrap();
    a.assert_clean("vA");
    assert!(!name_files.exists(), "name-file copies left");
    assert!(
        !run_dir.path().join("net.json").exists(),
        "the record outlives the cleanup"
    );
    // Twice is fine (delete after a failed delete).
    cleanup(run_dir.path(), &name_files).unwrap();
}

#[test]
fn an_engine_namespace_without_interface_fails_create_cleanly() {
    let empty = husk_tests::netns::Ns::new("vmempty");
    let mut husk = Husk::new(Guest::MicroVm);
    let bundle = bundle_in(empty.path().to_str().unwrap());
    let err = create_fails(&mut husk, &bundle, "net-empty");
    assert!(err.contains("no Ethernet interface"), "{err}");
    assert!(err.contains(empty.path().to_str().unwrap()), "{err}");
    empty.assert_clean("lo");
    husk.assert_nothing_left();
}

#[test]
fn a_new_network_namespace_has_only_loopback_and_it_is_up() {
    // The agent's own code path for a spec `network` entry without a path (the same
    // code runs in the guest); the test-only host agent runs it without a boot.
    let mut husk = Husk::new(Guest::HostAgent);
    let b = bundle("ip -o link");
    let out = husk.must(
        &["run", "-b", b.path().to_str().unwrap(), "net-lo"],
        TIMEOUT,
    );
    let links: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(links.len(), 1, "only loopback: {}", out.stdout);
    assert!(
        links[0].contains("lo:") && links[0].contains("LOOPBACK,UP"),
        "loopback must be up, as runc leaves it: {}",
        out.stdout
    );
    // `run` deletes the container once it exited, as runc does.
    husk.assert_nothing_left();
}
