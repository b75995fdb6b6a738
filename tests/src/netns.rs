//! Network namespaces for tests, as root: created with `ip netns`, deleted on drop with
//! everything in them. Only addresses inside namespaces the test creates are used.

use std::path::PathBuf;
use std::process::Command;

use husk::net::TAP_NAME;

/// A named network namespace, deleted on drop with everything in it.
pub struct Ns(pub String);

impl Ns {
    pub fn new(tag: &str) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "network namespace tests need root (namespaces, taps, tc)"
        );
        let name = format!("hn-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        // Only the test's frames: no IPv6 autoconfiguration chatter.
        for scope in ["all", "default"] {
            let key = format!("net.ipv6.conf.{scope}.disable_ipv6=1");
            run("ip", &["netns", "exec", &name, "sysctl", "-qw", &key]);
        }
        Self(name)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs inside the namespace (`ip netns exec NAME ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    pub fn ip_ok(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    }

    pub fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("tc", &all)
    }

    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let link: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])).unwrap();
        let s = link[0]["address"].as_str().unwrap();
        let mut mac = [0u8; 6];
        for (b, part) in mac.iter_mut().zip(s.split(':')) {
            *b = u8::from_str_radix(part, 16).unwrap();
        }
        mac
    }

    /// Nothing of husk's left: no tap, no ingress qdisc on `dev`.
    pub fn assert_clean(&self, dev: &str) {
        assert!(
            !self.ip_ok(&["link", "show", "dev", TAP_NAME]),
            "tap left behind"
        );
        let qdiscs = self.tc(&["qdisc", "show", "dev", dev]);
        assert!(!qdiscs.contains("ingress"), "qdisc left on {dev}: {qdiscs}");
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Gives an interface in `a` the name husk's tap would take (a veth whose peer lives in
/// `b`), so creating the tap there fails.
pub fn occupy_tap_name(a: &Ns, b: &Ns) {
    run(
        "ip",
        &[
            "link", "add", TAP_NAME, "netns", &a.0, "type", "veth", "peer", "name", "other0",
            "netns", &b.0,
        ],
    );
}

/// A and B joined by a veth pair; A also has a default route via B.
pub fn pair(tag: &str) -> (Ns, Ns) {
    let a = Ns::new(&format!("{tag}a"));
    let b = Ns::new(&format!("{tag}b"));
    run(
        "ip",
        &[
            "link", "add", "vA", "netns", &a.0, "mtu", "1400", "type", "veth", "peer", "name",
            "vB", "netns", &b.0,
        ],
    );
    a.ip(&["addr", "add", "10.200.0.1/24", "dev", "vA"]);
    b.ip(&["addr", "add", "10.200.0.2/24", "dev", "vB"]);
    a.ip(&["link", "set", "vA", "up"]);
    b.ip(&["link", "set", "vB", "up"]);
    a.ip(&["route", "add", "default", "via", "10.200.0.2"]);
    (a, b)
}
