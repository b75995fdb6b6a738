//! Tier 2: `husk inspect` on a plain container (`io.husk.isolation=container`, no VM):
//! the report's figures are those of the container's init in /proc, and the VM-only
//! fields are absent. The VM side is checked in `full_confinement_vm.rs`.

use std::time::Duration;

use husk_tests::cli::{bundle, edit_config, Guest, Husk};
use husk_tests::procfs::{effective_uid, status_field};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn inspect_reports_a_plain_container_from_proc() {
    let mut h = Husk::new(Guest::HostAgent);
    let b = bundle("exec sleep 1000");
    edit_config(b.path(), |c| {
        c["annotations"] = json!({"io.husk.isolation": "container"});
    });
    let id = "insp1";
    h.must(
        &["create", "--bundle", b.path().to_str().unwrap(), id],
        TIMEOUT,
    );
    h.must(&["start", id], TIMEOUT);
    h.wait_status(id, "running", TIMEOUT);
    let pid = h.state(id, TIMEOUT)["pid"].as_i64().unwrap();

    let out = h.must(&["inspect", "--format", "json", id], TIMEOUT);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["isolation"], "container", "{r}");
    assert_eq!(r["process"]["pid"], pid);
    assert_eq!(r["kernel"]["workload_runs_on"], "host");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r["kernel"]["host"], host.trim());
    assert!(r["kernel"]["guest"].is_null());
    let uid = effective_uid(&pid.to_string());
    assert_eq!(r["process"]["uid"], uid);
    for (key, field) in [("cap_eff", "CapEff"), ("cap_bnd", "CapBnd")] {
        let proc = u64::from_str_radix(&status_field(&pid.to_string(), field), 16).unwrap();
        assert_eq!(r["process"][key], proc, "{key}");
    }
    // The bundle's default profile-less config still gets its own namespaces.
    for kind in ["mnt", "pid", "ipc", "uts"] {
        let ns = &r["process"]["namespaces"][kind];
        let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        assert_eq!(ns["id"], link.to_string_lossy().as_ref(), "{kind}");
        assert_eq!(ns["shared_with_host"], false, "{kind}: {ns}");
    }
    assert!(r["memory"].is_null() && r["kvm_exits"].is_null(), "{r}");
    assert!(r["syscalls"]["vmm_union"].is_null(), "{r}");
    let table = h.must(&["inspect", id], TIMEOUT).stdout;
    assert!(
        table.contains("isolation              container"),
        "{table}"
    );
    assert!(table.contains(&format!("host {}", host.trim())), "{table}");

    let missing = h.run_for(&["inspect", "nosuch"], TIMEOUT);
    assert_ne!(missing.code, Some(0));
    assert!(missing.stderr.contains("does not exist"), "{missing:?}");
    h.must(&["delete", "--force", id], TIMEOUT);
    h.assert_nothing_left();
}
