//! Reads the one Ethernet interface of a network namespace: name, MAC, MTU, IPv4
//! addresses and routes, as the guest must reproduce them.

use std::net::Ipv4Addr;

use husk_protocol::messages::{Ipv4Net, Ipv4Route, NetInterface};
use serde::Deserialize;

use super::{run_in, NetError, Netns, TAP_NAME};

#[derive(Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    mtu: u64,
}

#[derive(Deserialize)]
struct AddrList {
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    family: String,
    local: Option<Ipv4Addr>,
    prefixlen: u8,
}

#[derive(Deserialize)]
struct Route {
    dst: String,
    gateway: Option<Ipv4Addr>,
    protocol: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn json<T: serde::de::DeserializeOwned>(netns: &Netns, args: &[&str]) -> Result<Vec<T>, NetError> {
    let out = run_in(netns, "ip", args)?;
    serde_json::from_str(&out).map_err(|e| NetError::Parse {
        command: format!("ip {}", args.join(" ")),
        reason: e.to_string(),
    })
}

/// The namespace's interface, as the guest will get it (`NetInterface::name` is its
/// name in the namespace).
pub fn interface(netns: &Netns) -> Result<NetInterface, NetError> {
    let links: Vec<Link> = json(netns, &["-j", "link", "show"])?;
    // Loopback and the tunnel fallback devices (sit0, tunl0, ...) a new namespace may
    // hold are not Ethernet; our own tap would be, and is never the container's.
    let mut ether: Vec<Link> = links
        .into_iter()
        .filter(|l| l.link_type == "ether" && l.ifname != TAP_NAME)
        .collect();
    let link = match ether.len() {
        0 => {
            return Err(NetError::NoInterface {
                netns: netns.path().to_owned(),
            })
        }
        1 => ether.remove(0),
        _ => {
            return Err(NetError::SeveralInterfaces {
                netns: netns.path().to_owned(),
                names: ether
                    .iter()
                    .map(|l| l.ifname.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let mac = parse_mac(&link.address)
        .filter(|m| m != &[0; 6] && m[0] & 1 == 0)
        .ok_or_else(|| NetError::BadMac {
            netns: netns.path().to_owned(),
            name: link.ifname.clone(),
            mac: link.address.clone(),
        })?;
    let mtu = u16::try_from(link.mtu)
        .ok()
        .filter(|m| *m >= 68)
        .ok_or_else(|| NetError::BadMtu {
            netns: netns.path().to_owned(),
            name: link.ifname.clone(),
            mtu: link.mtu,
        })?;
    let dev = link.ifname.as_str();
    let addrs: Vec<AddrList> = json(netns, &["-j", "-4", "addr", "show", "dev", dev])?;
    let addresses = addrs
        .iter()
        .flat_map(|a| &a.addr_info)
        .filter(|i| i.family == "inet")
        .filter_map(|i| {
            i.local.map(|addr| Ipv4Net {
                addr,
                prefix_len: i.prefixlen,
            })
        })
        .collect();
    let raw: Vec<Route> = json(
        netns,
        &["-j", "-4", "route", "show", "table", "main", "dev", dev],
    )?;
    let routes = routes(raw).map_err(|reason| NetError::Parse {
        command: format!("ip -j -4 route show table main dev {dev}"),
        reason,
    })?;
    Ok(NetInterface {
        name: link.ifname,
        mac,
        mtu,
        addresses,
        routes,
    })
}

/// The routes the guest must add, directly attached ones first (a gateway must be
/// reachable when its route is added). Routes the kernel made for an address are left
/// out: the guest kernel makes them too when the agent adds the address.
fn routes(raw: Vec<Route>) -> Result<Vec<Ipv4Route>, String> {
    let mut routes = Vec::new();
    for r in raw {
        if r.protocol.as_deref() == Some("kernel")
            || r.kind.as_deref().is_some_and(|k| k != "unicast")
        {
            continue;
        }
        let dest = if r.dst == "default" {
            None
        } else {
            let (addr, prefix) = r.dst.split_once('/').unwrap_or((&r.dst, "32"));
            let addr = addr
                .parse()
                .map_err(|_| format!("bad destination {}", r.dst))?;
            let prefix_len = prefix
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("bad prefix in {}", r.dst))?;
            Some(Ipv4Net { addr, prefix_len })
        };
        routes.push(Ipv4Route {
            dest,
            gateway: r.gateway,
        });
    }
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(routes)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing_takes_exactly_six_hex_bytes() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:0a"),
            Some([0x02, 0x42, 0xac, 0x11, 0, 0x0a])
        );
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:0a:01"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:zz"), None);
    }

    #[test]
    fn routes_skip_kernel_ones_and_put_gateways_last() {
        let raw: Vec<Route> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.0.0.1","flags":[]},
                {"dst":"10.0.0.0/24","protocol":"kernel","scope":"link","prefsrc":"10.0.0.2","flags":[]},
                {"dst":"10.0.0.1","scope":"link","flags":[]},
                {"dst":"10.9.0.0/16","gateway":"10.0.0.1","flags":[]}]"#,
        )
        .unwrap();
        let routes = routes(raw).unwrap();
        assert_eq!(routes.len(), 3);
        assert_eq!(
            routes[0].dest,
            Some(Ipv4Net {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix_len: 32
            })
        );
        assert_eq!(routes[0].gateway, None);
        assert_eq!(routes[1].dest, None);
        assert_eq!(routes[2].dest.unwrap().prefix_len, 16);
    }

    #[test]
    fn a_bad_route_destination_is_an_error() {
        let raw: Vec<Route> =
            serde_json::from_str(r#"[{"dst":"10.0.0.0/40","flags":[]}]"#).unwrap();
        assert!(routes(raw).unwrap_err().contains("10.0.0.0/40"));
    }
}
