//! Tier 3, full path: guest templates (issue 9). The first `--isolation vm` sandbox of a
//! configuration boots cold and saves the guest, at agent ready, as the template under
//! `--root`; later ones are restored from it, each with its own clock and entropy; a
//! damaged template is refused, the sandbox boots cold and the template is made again.
//! Four sandboxes in one root: two cold boots (~55 s each here), two restores.
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

    // 1. No template yet: a cold boot, which leaves exactly one template behind.
    let cold = sandbox(&mut h, b.path(), "t1");
    assert!(!cold.restored, "the first sandbox of a root boots cold");
    let made = templates(&h);
    assert_eq!(made.len(), 1, "one template: {made:?}");
    assert!(made[0].extension().is_some_and(|e| e == "snap"), "{made:?}");

    // 2. A damaged template: refused, a cold boot instead, and the template made again.
    std::fs::write(&made[0], b"not a snapshot").unwrap();
    let after_damage = sandbox(&mut h, b.path(), "t2");
    assert!(
        !after_damage.restored,
        "a damaged template must not be used"
    );
    let remade = std::fs::metadata(&made[0]).unwrap().len();
    assert!(
        remade > 1 << 20,
        "the template is made again ({remade} bytes)"
    );

    // 3. Two sandboxes restored from it: each its own entropy, both the host's time.
    let first = sandbox(&mut h, b.path(), "t3");
    let second = sandbox(&mut h, b.path(), "t4");
    assert!(
        first.restored && second.restored,
        "restored from the template"
    );
    let randoms = [
        &cold.random,
        &after_damage.random,
        &first.random,
        &second.random,
    ];
    assert_eq!(
        randoms[2].len(),
        32,
        "16 random bytes in hex: {:?}",
        randoms[2]
    );
    for (i, a) in randoms.iter().enumerate() {
        for b in &randoms[i + 1..] {
            assert_ne!(a, b, "two sandboxes read the same random bytes");
        }
    }
    for s in [&first, &second] {
        let drift = host_time().abs_diff(s.guest_time);
        assert!(
            drift < 300,
            "a restored guest tells the host's time, not the template's ({drift} s off)"
        );
    }
    eprintln!(
        "figure: create+start+output+delete: cold {} ms, restored {} ms and {} ms",
        cold.took.as_millis(),
        first.took.as_millis(),
        second.took.as_millis()
    );
    h.assert_nothing_left();
}
