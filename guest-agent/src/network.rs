//! Configures the guest's network interfaces over rtnetlink, as the host found them in
//! the container's network namespace: the workload sees the address its engine assigned.
//!
//! Plain synchronous netlink (`netlink-sys` + `netlink-packet-route`): a handful of
//! requests, once, on a path where every syscall costs guest-kernel emulation time; no
//! async runtime and no `ip` binary in the guest.

use std::io;
use std::net::IpAddr;

use husk_protocol::messages::{Ipv4Route, NetInterface, NetworkConfig};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The main routing table (RT_TABLE_MAIN).
const RT_TABLE_MAIN: u8 = 254;

/// Errors configuring the guest network.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetworkError {
    /// cannot open a netlink socket (is CONFIG_NET in the guest kernel?): {0}
    Socket(#[source] io::Error),
    /// no guest interface has MAC {mac}; is the virtio-net device attached and CONFIG_VIRTIO_NET in the guest kernel?
    NoInterface { mac: String },
    /// {what} on {interface} failed: {source}
    Request {
        what: String,
        interface: String,
        source: io::Error,
    },
}

/// Loopback is the first device of every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_INDEX: u32 = 1;

/// Applies `config` to the calling thread's network namespace (and brings its loopback
/// up: the container shares this namespace).
pub fn configure(config: &NetworkConfig) -> Result<(), NetworkError> {
    let mut rtnl = Rtnl::open()?;
    rtnl.set_link(LOOPBACK_INDEX, true, vec![])
        .map_err(|source| NetworkError::Request {
            what: "setting the link up".into(),
            interface: "lo".into(),
            source,
        })?;
    for iface in &config.interfaces {
        configure_interface(&mut rtnl, iface)?;
    }
    Ok(())
}

/// Brings up the loopback of process `pid`'s network namespace, as runc does for a
/// container with a new one: youki's libcontainer leaves it down. `setns` moves only the
/// calling thread, so a short-lived thread does it.
pub fn loopback_up_in(pid: i32) -> Result<(), NetworkError> {
    let path = format!("/proc/{pid}/ns/net");
    let enter = |source: io::Error| NetworkError::Request {
        what: format!("entering {path}"),
        interface: "lo".into(),
        source,
    };
    let netns = std::fs::File::open(&path).map_err(enter)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| enter(e.into()))?;
                Rtnl::open()?
                    .set_link(LOOPBACK_INDEX, true, vec![])
                    .map_err(|source| NetworkError::Request {
                        what: "setting the link up".into(),
                        interface: "lo".into(),
                        source,
                    })
            })
            .join()
            .unwrap_or_else(|_| Err(enter(io::Error::other("the netns thread panicked"))))
    })
}

fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn configure_interface(rtnl: &mut Rtnl, iface: &NetInterface) -> Result<(), NetworkError> {
    let index = rtnl
        .find_link_by_mac(&iface.mac)?
        .ok_or_else(|| NetworkError::NoInterface {
            mac: mac_string(&iface.mac),
        })?;
    let fail = |what: &str| {
        let what = what.to_owned();
        let interface = iface.name.clone();
        move |source| NetworkError::Request {
            what,
            interface,
            source,
        }
    };
    // A link must be down to be renamed; it is down anyway until we are done.
    rtnl.set_link(index, false, vec![])
        .map_err(fail("setting the link down"))?;
    rtnl.set_link(
        index,
        false,
        vec![
            LinkAttribute::IfName(iface.name.clone()),
            LinkAttribute::Mtu(u32::from(iface.mtu)),
        ],
    )
    .map_err(fail("setting name and MTU"))?;
    for net in &iface.addresses {
        rtnl.add_address(index, IpAddr::V4(net.addr), net.prefix_len)
            .map_err(fail(&format!("adding {}/{}", net.addr, net.prefix_len)))?;
    }
    // Routes need the link up (the kernel refuses gateways on a down link).
    rtnl.set_link(index, true, vec![])
        .map_err(fail("setting the link up"))?;
    for route in &iface.routes {
        rtnl.add_route(index, route)
            .map_err(fail(&format!("adding route {route:?}")))?;
    }
    Ok(())
}

/// A route netlink socket that sends one request at a time and waits for its answer.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Self, NetworkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetworkError::Socket)?;
        socket.bind_auto().map_err(NetworkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetworkError::Socket)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `msg` and collects the answers: the dump's messages, or nothing for an ACK.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(answers),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    fn find_link_by_mac(&mut self, mac: &[u8; 6]) -> Result<Option<u32>, NetworkError> {
        let links = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|source| NetworkError::Request {
                what: "listing links".into(),
                interface: "all".into(),
                source,
            })?;
        Ok(links.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Address(a) if a == mac))
                .then_some(link.header.index),
            _ => None,
        }))
    }

    fn set_link(&mut self, index: u32, up: bool, attrs: Vec<LinkAttribute>) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.change_mask = LinkFlags::Up;
        if up {
            link.header.flags = LinkFlags::Up;
        }
        link.attributes = attrs;
        self.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
            .map(drop)
    }

    fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes = vec![
            AddressAttribute::Local(addr),
            AddressAttribute::Address(addr),
        ];
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    fn add_route(&mut self, index: u32, route: &Ipv4Route) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some(dest) = route.dest {
            msg.header.destination_prefix_length = dest.prefix_len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dest.addr)));
        }
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    //! Tier 2: the real kernel, inside a network namespace the test creates, with a veth
    //! interface standing in for the guest's virtio-net NIC.

    use std::net::Ipv4Addr;
    use std::process::Command;

    use husk_protocol::messages::{Ipv4Net, Ipv4Route, NetInterface, NetworkConfig};

    use super::*;

    /// A named network namespace (`ip netns add`), deleted on drop.
    struct TestNetns(String);

    impl TestNetns {
        fn new(tag: &str) -> Self {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(euid, 0, "network tests need root (network namespaces)");
            let name = format!("husk-agent-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            ip(&["netns", "add", &name]);
            Self(name)
        }

        fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", self.0.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        }

        /// Runs `f` on a thread that joined this namespace.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    f()
                })
                .join()
                .unwrap()
            })
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x01];

    fn config() -> NetworkConfig {
        let net = |a, prefix_len| Ipv4Net {
            addr: a,
            prefix_len,
        };
        NetworkConfig {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac: MAC,
                mtu: 1400,
                addresses: vec![net(Ipv4Addr::new(10, 201, 0, 2), 24)],
                routes: vec![
                    Ipv4Route {
                        dest: Some(net(Ipv4Addr::new(10, 202, 0, 0), 16)),
                        gateway: Some(Ipv4Addr::new(10, 201, 0, 1)),
                    },
                    Ipv4Route {
                        dest: None,
                        gateway: Some(Ipv4Addr::new(10, 201, 0, 1)),
                    },
                ],
            }],
        }
    }

    /// The guest NIC stand-in: `nic9`, a veth with the configured MAC.
    fn add_nic_with_mac(ns: &TestNetns) {
        ns.ip(&[
            "link",
            "add",
            "nic9",
            "address",
            &mac_string(&MAC),
            "type",
            "veth",
            "peer",
            "name",
            "peer9",
        ]);
    }

    #[test]
    fn configures_the_interface_with_that_mac() {
        let ns = TestNetns::new("cfg");
        add_nic_with_mac(&ns);
        // A second interface that must stay untouched.
        ns.ip(&[
            "link", "add", "other0", "type", "veth", "peer", "name", "other1",
        ]);
        ns.run(|| configure(&config())).unwrap();

        let link = ns.ip(&["-j", "link", "show", "dev", "eth0"]);
        let link: serde_json::Value = serde_json::from_str(&link).unwrap();
        assert_eq!(link[0]["address"], mac_string(&MAC));
        assert_eq!(link[0]["mtu"], 1400);
        assert!(link[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP"));
        let addr = ns.ip(&["-j", "-4", "addr", "show", "dev", "eth0"]);
        let addr: serde_json::Value = serde_json::from_str(&addr).unwrap();
        let info = addr[0]["addr_info"].as_array().unwrap();
        assert_eq!(info.len(), 1, "{addr}");
        assert_eq!(info[0]["local"], "10.201.0.2");
        assert_eq!(info[0]["prefixlen"], 24);
        let routes = ns.ip(&["-j", "-4", "route", "show", "dev", "eth0"]);
        let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
        let via = |dst: &str| {
            routes
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["dst"] == dst)
                .map(|r| r["gateway"].clone())
        };
        assert_eq!(via("default"), Some("10.201.0.1".into()), "{routes}");
        assert_eq!(via("10.202.0.0/16"), Some("10.201.0.1".into()), "{routes}");
        let other = ns.ip(&["-j", "-4", "addr", "show", "dev", "other0"]);
        assert!(!other.contains("10.201"), "{other}");

        // Applying it again (an agent retry) changes nothing and does not fail.
        ns.run(|| configure(&config())).unwrap();
        let again = ns.ip(&["-j", "-4", "addr", "show", "dev", "eth0"]);
        let again: serde_json::Value = serde_json::from_str(&again).unwrap();
        assert_eq!(
            again[0]["addr_info"].as_array().unwrap().len(),
            1,
            "{again}"
        );
    }

    #[test]
    fn a_missing_mac_is_named_in_the_error() {
        let ns = TestNetns::new("nomac");
        ns.ip(&[
            "link", "add", "nic9", "type", "veth", "peer", "name", "peer9",
        ]);
        let err = ns.run(|| configure(&config())).unwrap_err();
        assert!(matches!(err, NetworkError::NoInterface { .. }), "{err}");
        assert!(err.to_string().contains(&mac_string(&MAC)), "{err}");
    }

    #[test]
    fn an_unreachable_gateway_is_an_error_naming_the_route() {
        let ns = TestNetns::new("gw");
        add_nic_with_mac(&ns);
        let mut config = config();
        config.interfaces[0].routes = vec![Ipv4Route {
            dest: None,
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        }];
        let err = ns.run(|| configure(&config)).unwrap_err();
        assert!(err.to_string().contains("192.0.2.1"), "{err}");
    }
}
