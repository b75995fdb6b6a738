//! Tier 3, full path: guest templates (issue 9). The first `--isolation vm` sandbox of a
//! configuration boots a guest to agent ready, saves it as the template under `--root`,
//! and is restored from it, as every later one is, each with its own clock and entropy;
//! a damaged template is refused and removed (that sandbox boots cold) and the next
//! sandbox makes it again. Four sandboxes in one root: three boots (~45 s each here).
//!
//! Needs root, /dev/kvm and `scripts/setup.sh`; holds `/tmp/husk-vm.lock`.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk::sandbox::vm::TEMPLATES_DIR;
use husk_tests::cli::{bundle, wait_child, Guest, Husk};
use husk_tests::vm_lock;

/// Boot plus container creation, with room for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What one sandbox printed and how its guest started.
struct Sandbox {
    random: String,
    guest_time: u64,
    restored: bool,
    made_template: bool,
    took: Duration,
}

/// create (checking the daemon's log for how the guest started), start, wait for the
/// output, delete.
fn sandbox(h: &mut Husk, bundle: &std::path::Path, id: &str) -> Sandbox {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out");
    h.track(&[id]);
    let mut create = h
        .command(&["create", "--bundle", bundle.to_str().unwrap(), id])
        .stdout(File::create(&out_file).unwrap())
        .stderr(File::create(dir.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    let code = wait_child(&mut create, BOOT_TIMEOUT);
    let log = std::fs::read_to_string(h.root().join(id).join("daemon.log")).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "create {id}: {}\ndaemon log:\n{log}",
        std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
    );
    let restored = log.contains("restored from a template");
    let made_template = log.contains("template") && log.contains(" made: ");
    assert!(
        restored || log.contains("cold boot"),
        "the daemon logs how the guest started:\n{log}"
    );
    h.must(&["start", id], CALL_TIMEOUT);
    h.wait_status(id, "stopped", CALL_TIMEOUT);
    let took = t0.elapsed();
    h.must(&["delete", id], CALL_TIMEOUT);
    let out = std::fs::read_to_string(&out_file).unwrap();
    let mut lines = out.lines();
    let (Some(random), Some(time)) = (lines.next(), lines.next()) else {
        panic!("{id} printed {out:?}\ndaemon log:\n{log}");
    };
    Sandbox {
        random: random.to_string(),
        guest_time: time.trim().parse().unwrap_or_else(|_| panic!("{out:?}")),
        restored,
        made_template,
        took,
    }
}

fn templates(h: &Husk) -> Vec<PathBuf> {
    std::fs::read_dir(h.root().join(TEMPLATES_DIR))
        .map(|dir| dir.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn host_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn sandboxes_start_from_a_template_with_their_own_clock_and_entropy() {
    let _vm = vm_lock::hold();
    let mut h = Husk::new(Guest::MicroVm);
    let b = bundle("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s");

    // 1. No template yet: this sandbox makes it, then starts from it.
    let first = sandbox(&mut h, b.path(), "t1");
    assert!(
        first.made_template && first.restored,
        "t1 makes the template and uses it"
    );
    let made = templates(&h);
    assert_eq!(made.len(), 1, "one template: {made:?}");
    assert!(made[0].extension().is_some_and(|e| e == "snap"), "{made:?}");

    // 2. A damaged template: refused and removed; this sandbox boots cold.
    std::fs::write(&made[0], b"not a snapshot").unwrap();
    let cold = sandbox(&mut h, b.path(), "t2");
    assert!(!cold.restored, "a damaged template must not be used");
    assert!(templates(&h).is_empty(), "the damaged template is removed");

    // 3. The next sandbox makes it again; the one after only restores.
    let second = sandbox(&mut h, b.path(), "t3");
    let third = sandbox(&mut h, b.path(), "t4");
    assert!(
        second.made_template && second.restored,
        "t3 makes the template again"
    );
    assert!(third.restored && !third.made_template, "t4 restores only");

    let randoms = [&first.random, &cold.random, &second.random, &third.random];
    assert_eq!(
        randoms[3].len(),
        32,
        "16 random bytes in hex: {:?}",
        randoms[3]
    );
    for (i, a) in randoms.iter().enumerate() {
        for b in &randoms[i + 1..] {
            assert_ne!(a, b, "two sandboxes read the same random bytes");
        }
    }
    for s in [&first, &second, &third] {
        let drift = host_time().abs_diff(s.guest_time);
        assert!(
            drift < 300,
            "a restored guest tells the host's time, not the template's ({drift} s off)"
        );
    }
    eprintln!(
        "figure: create+start+output+delete: making the template {} ms, cold {} ms, restored {} ms",
        first.took.as_millis(),
        cold.took.as_millis(),
        third.took.as_millis()
    );
    h.assert_nothing_left();
}
