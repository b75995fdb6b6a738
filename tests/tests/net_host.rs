//! Host side of networking, as root, with namespaces the test creates: two namespaces A
//! and B joined by a veth pair (10.200.0.1/24 in A, 10.200.0.2/24 in B). husk attaches to
//! A; frames written to the tap must reach B and B's answers must come back through the
//! tap, which proves the TC redirect both ways without a guest.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use husk::net::{NetError, NetnsAttachment, NetnsError, TAP_NAME};
use husk::vmm::devices::virtio::net::Tap;
use husk_protocol::messages::{Ipv4Net, Ipv4Route};
use husk_tests::netns::{occupy_tap_name, pair, Ns};

const VNET_HDR_LEN: usize = 12;

fn write_frame(tap: &Tap, frame: &[u8]) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    assert_eq!(tap.write_frame(&buf).unwrap(), buf.len());
}

/// The next frame from the tap for which `want` holds (others are skipped), within 2 s.
fn read_frame(tap: &Tap, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 70_000];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            return None;
        }
        let n = tap.read_frame(&mut buf).unwrap();
        let frame = &buf[VNET_HDR_LEN..n];
        if want(frame) {
            return Some(frame.to_vec());
        }
    }
}

fn arp_request(src_mac: [u8; 6], src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"husk-net-test-payload");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn attach_reads_the_interface_and_redirects_both_ways() {
    let (a, b) = pair("rd");
    let mac_a = a.mac("vA");
    let mac_b = b.mac("vB");
    let mut att = NetnsAttachment::create(&a.path()).unwrap();

    let iface = att.interface().clone();
    assert_eq!(iface.name, "vA");
    assert_eq!(iface.mac, mac_a);
    assert_eq!(iface.mtu, 1400);
    assert_eq!(
        iface.addresses,
        vec![Ipv4Net {
            addr: Ipv4Addr::new(10, 200, 0, 1),
            prefix_len: 24
        }]
    );
    assert_eq!(
        iface.routes,
        vec![Ipv4Route {
            dest: None,
            gateway: Some(Ipv4Addr::new(10, 200, 0, 2))
        }]
    );
    assert_eq!(att.net_config().mac, mac_a);

    // The tap exists with the interface's MTU, and both ingress hooks redirect.
    let tap_link: serde_json::Value =
        serde_json::from_str(&a.ip(&["-j", "link", "show", "dev", TAP_NAME])).unwrap();
    assert_eq!(tap_link[0]["mtu"], 1400);
    let to_tap = a.tc(&["filter", "show", "dev", "vA", "ingress"]);
    assert!(
        to_tap.contains("mirred") && to_tap.contains(TAP_NAME),
        "{to_tap}"
    );
    let to_veth = a.tc(&["filter", "show", "dev", TAP_NAME, "ingress"]);
    assert!(
        to_veth.contains("mirred") && to_veth.contains("vA"),
        "{to_veth}"
    );

    let tap = att.take_tap().unwrap();
    assert!(att.take_tap().is_none());
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 2));
    // ARP: out through the tap to B, B's reply back to the tap.
    write_frame(&tap, &arp_request(mac_a, ip_a, ip_b));
    let reply = read_frame(&tap, |f| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
    })
    .expect("no ARP reply from B came back through the tap");
    assert_eq!(&reply[0..6], &mac_a, "reply addressed to A's MAC");
    assert_eq!(&reply[22..28], &mac_b, "B answered with its MAC");
    assert_eq!(&reply[28..32], &ip_b.octets());
    // ICMP echo, both ways again.
    write_frame(&tap, &icmp_echo(mac_a, mac_b, ip_a, ip_b, 0x4b53));
    let echo = read_frame(&tap, |f| {
        f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
    })
    .expect("no ICMP echo reply from B came back through the tap");
    assert_eq!(&echo[26..30], &ip_b.octets());
    assert_eq!(&echo[38..40], &0x4b53u16.to_be_bytes(), "our echo id");

    drop(tap);
    att.remove().unwrap();
    a.assert_clean("vA");
    assert!(
        a.ip_ok(&["link", "show", "dev", "vA"]),
        "the container's interface stays"
    );
}

#[test]
fn remove_while_the_tap_fd_is_open_and_after_the_interface_vanished() {
    let (a, _b) = pair("rm");
    let mut att = NetnsAttachment::create(&a.path()).unwrap();
    let tap = att.take_tap().unwrap();
    // The engine tore the interface down first (its veth peer goes with it).
    a.ip(&["link", "del", "vA"]);
    att.remove().unwrap();
    assert!(
        !a.ip_ok(&["link", "show", "dev", TAP_NAME]),
        "tap deleted though a VMM held it"
    );
    let mut buf = [0u8; 64];
    assert!(
        tap.read_frame(&mut buf).is_err(),
        "the VMM's tap fd is dead"
    );
}

#[test]
fn a_missing_path_or_a_non_namespace_is_a_clear_error() {
    let err =
        NetnsAttachment::create(std::path::Path::new("/run/netns/husk-no-such-ns")).unwrap_err();
    assert!(
        matches!(err, NetError::Netns(NetnsError::Missing(_))),
        "{err}"
    );
    assert!(
        err.to_string().contains("/run/netns/husk-no-such-ns"),
        "{err}"
    );
    let err = NetnsAttachment::create(std::path::Path::new("/proc/self/status")).unwrap_err();
    assert!(
        matches!(err, NetError::Netns(NetnsError::NotNetns(_))),
        "{err}"
    );
}

#[test]
fn no_interface_or_several_are_errors_naming_them() {
    let empty = Ns::new("empty");
    let err = NetnsAttachment::create(&empty.path()).unwrap_err();
    assert!(matches!(err, NetError::NoInterface { .. }), "{err}");
    empty.assert_clean("lo");

    let two = Ns::new("two");
    two.ip(&[
        "link", "add", "eth7", "type", "veth", "peer", "name", "eth8",
    ]);
    let err = NetnsAttachment::create(&two.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NetError::SeveralInterfaces { .. }), "{msg}");
    assert!(msg.contains("eth7") && msg.contains("eth8"), "{msg}");
    two.assert_clean("eth7");
}

#[test]
fn a_tap_that_cannot_be_created_leaves_nothing_and_touches_nothing() {
    let (a, b) = pair("busy");
    // Someone else's interface already has the tap's name (its peer lives in B).
    occupy_tap_name(&a, &b);
    let err = NetnsAttachment::create(&a.path()).unwrap_err();
    assert!(matches!(err, NetError::Tap { .. }), "{err}");
    assert!(err.to_string().contains(TAP_NAME), "{err}");
    assert!(
        a.ip_ok(&["link", "show", "dev", TAP_NAME]),
        "not ours to delete"
    );
    let qdiscs = a.tc(&["qdisc", "show", "dev", "vA"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

#[test]
fn a_foreign_ingress_qdisc_fails_the_attach_and_is_left_alone() {
    let (a, _b) = pair("qd");
    a.tc(&["qdisc", "add", "dev", "vA", "ingress"]);
    let err = NetnsAttachment::create(&a.path()).unwrap_err();
    assert!(matches!(err, NetError::Command { .. }), "{err}");
    assert!(
        err.to_string().contains("tc qdisc add dev vA ingress"),
        "{err}"
    );
    assert!(
        !a.ip_ok(&["link", "show", "dev", TAP_NAME]),
        "tap left behind"
    );
    let qdiscs = a.tc(&["qdisc", "show", "dev", "vA"]);
    assert!(
        qdiscs.contains("ingress"),
        "the engine's qdisc was removed: {qdiscs}"
    );
}
