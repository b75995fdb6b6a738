//! [`NetnsAttachment`]: a tap in the container's network namespace, joined to the
//! namespace's interface by TC redirects both ways.

use std::io;
use std::path::Path;

use husk_protocol::messages::NetInterface;
use log::warn;

use super::{inspect, run_in, tc, NetError, Netns};
use crate::vmm::devices::virtio::net::{NetConfig, Tap};

/// The tap's name inside the namespace (one VM NIC per namespace).
pub const TAP_NAME: &str = "tap0_husk";

/// A namespace's interface joined to a tap.
#[derive(Debug)]
pub struct NetnsAttachment {
    netns: Netns,
    interface: NetInterface,
    tap: Option<Tap>,
}

/// What is set up so far, to undo on a failure.
struct Undo<'a> {
    netns: &'a Netns,
    qdiscs: Vec<String>,
}

impl Undo<'_> {
    fn run(&mut self) {
        for dev in self.qdiscs.drain(..).rev() {
            if let Err(e) = tc::remove(self.netns, &dev) {
                warn!("net: cleanup: {e}");
            }
        }
        delete_tap(self.netns);
    }
}

/// Deletes the tap even while a VMM still holds its fd (the link goes, the fd then
/// fails). A tap already gone is fine.
pub(crate) fn delete_tap(netns: &Netns) -> Option<NetError> {
    match run_in(netns, "ip", &["link", "del", "dev", TAP_NAME]) {
        Ok(_) => None,
        Err(NetError::Command { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            None
        }
        Err(e) => Some(e),
    }
}

impl NetnsAttachment {
    /// Attaches to the network namespace at `netns_path`: reads its one Ethernet
    /// interface, creates [`TAP_NAME`] in it with the same MTU, and redirects frames
    /// between the two. On failure nothing is left behind.
    pub fn create(netns_path: &Path) -> Result<Self, NetError> {
        let netns = Netns::open(netns_path)?;
        let interface = inspect::interface(&netns)?;
        let tap = netns
            .run(|| Tap::create(TAP_NAME))?
            .map_err(|source| NetError::Tap {
                netns: netns.path().to_owned(),
                source,
            })?;
        let mut undo = Undo {
            netns: &netns,
            qdiscs: Vec::new(),
        };
        match Self::join(&netns, &interface, &mut undo) {
            Ok(()) => {}
            Err(e) => {
                drop(tap);
                undo.run();
                return Err(e);
            }
        }
        Ok(Self {
            netns,
            interface,
            tap: Some(tap),
        })
    }

    fn join(netns: &Netns, iface: &NetInterface, undo: &mut Undo<'_>) -> Result<(), NetError> {
        // The tap carries the guest's frames only: no IPv6 autoconfiguration chatter of
        // its own. Without IPv6 in the host kernel the file does not exist.
        netns.run(|| {
            let knob = format!("/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6");
            match std::fs::write(knob, "1") {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    warn!("net: cannot disable IPv6 on {TAP_NAME}: {e}")
                }
                _ => {}
            }
        })?;
        let mtu = iface.mtu.to_string();
        run_in(
            netns,
            "ip",
            &["link", "set", "dev", TAP_NAME, "mtu", &mtu, "up"],
        )?;
        tc::redirect(netns, &iface.name, TAP_NAME)?;
        undo.qdiscs.push(iface.name.clone());
        tc::redirect(netns, TAP_NAME, &iface.name)?;
        undo.qdiscs.push(TAP_NAME.to_owned());
        Ok(())
    }

    /// What the guest interface must look like (for `ConfigureNetwork`).
    pub fn interface(&self) -> &NetInterface {
        &self.interface
    }

    /// The virtio-net device's configuration: the interface's MAC and MTU.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            mac: self.interface.mac,
            mtu: self.interface.mtu,
        }
    }

    /// The tap, opened inside the namespace, for the VMM's net device. `None` once taken.
    pub fn take_tap(&mut self) -> Option<Tap> {
        self.tap.take()
    }

    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// Removes the filters, the qdiscs and the tap. An interface that is already gone
    /// (the namespace was torn down first) is not an error.
    pub fn remove(mut self) -> Result<(), NetError> {
        drop(self.tap.take());
        let mut first = None;
        for dev in [self.interface.name.as_str(), TAP_NAME] {
            match tc::remove(&self.netns, dev) {
                Ok(()) => {}
                Err(NetError::Command { stderr, .. })
                    if stderr.contains("Cannot find device")
                        || stderr.contains("Cannot find specified qdisc") =>
                {
                    // Gone with its interface, or never there.
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = delete_tap(&self.netns) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}
