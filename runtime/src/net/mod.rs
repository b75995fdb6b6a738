//! Host side of container networking: join a container's network namespace (as CNI,
//! containerd or Docker prepared it) to the VM's virtio-net device.
//!
//! The model is Kata's "tcfilter": a tap is created inside the namespace, and TC ingress
//! filters with `mirred egress redirect` pass every frame from the namespace's interface
//! to the tap and back. The namespace's interface keeps its addresses (nothing in the
//! namespace uses them once its traffic is redirected); the guest NIC gets the same MAC,
//! MTU, addresses and routes, so peers see the same host they were told about.
//!
//! - [`netns`]: a namespace by path; run code or commands inside it.
//! - [`inspect`]: what the namespace's interface looks like.
//! - [`tc`]: the redirect filters.
//! - [`attach`]: [`NetnsAttachment`], the whole setup and its removal.
//! - [`guest`]: what a VM sandbox makes of the spec (namespace path, name files) and
//!   the cleanup `husk delete` runs.
//!
//! Host-side commands: the filters are made with `tc`, and the interface read with
//! `ip -j` (iproute2). It runs once per sandbox, the filter syntax is exactly what
//! operators use to inspect and debug the result, and `tc`'s own messages say what the
//! kernel refused; hand-encoding u32 selectors and mirred actions in netlink would be
//! more code to get wrong for no gain here. The tap itself is made in-process (an ioctl),
//! since its fd must come from inside the namespace.

pub mod attach;
pub mod guest;
pub mod inspect;
pub mod netns;
pub mod tc;

pub use attach::{NetnsAttachment, TAP_NAME};
pub use netns::{Netns, NetnsError};

use std::io;
use std::path::PathBuf;

use crate::vmm::devices::virtio::net::TapError;

/// Errors of the host-side network setup.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetError {
    /// {0}
    Netns(#[from] NetnsError),
    /// cannot run {program} in network namespace {netns} (is iproute2 installed?): {source}
    Spawn {
        program: String,
        netns: PathBuf,
        source: io::Error,
    },
    /// `{command}` in network namespace {netns} failed: {stderr}
    Command {
        command: String,
        netns: PathBuf,
        stderr: String,
    },
    /// cannot parse the output of `{command}`: {reason}
    Parse { command: String, reason: String },
    /// network namespace {netns} has no Ethernet interface besides loopback; the container engine (CNI) should have created one
    NoInterface { netns: PathBuf },
    /// network namespace {netns} has several Ethernet interfaces ({names}); husk supports exactly one
    SeveralInterfaces { netns: PathBuf, names: String },
    /// interface {name} in network namespace {netns} has MAC {mac:?}, not a unicast Ethernet address
    BadMac {
        netns: PathBuf,
        name: String,
        mac: String,
    },
    /// interface {name} in network namespace {netns} has MTU {mtu}, outside 68..=65535
    BadMtu {
        netns: PathBuf,
        name: String,
        mtu: u64,
    },
    /// cannot create the tap in network namespace {netns}: {source}
    Tap { netns: PathBuf, source: TapError },
}

/// Runs `program args` inside `netns`; its stdout, or an error quoting its stderr.
pub(crate) fn run_in(netns: &Netns, program: &str, args: &[&str]) -> Result<String, NetError> {
    let output = netns
        .command(program)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            program: program.to_owned(),
            netns: netns.path().to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            netns: netns.path().to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(output.stdout).map_err(|e| NetError::Parse {
        command: format!("{program} {}", args.join(" ")),
        reason: e.to_string(),
    })
}
