//! The TC redirect between two interfaces of one namespace: an ingress qdisc on the
//! source and a match-all u32 filter whose action sends every frame out of the target
//! (`mirred egress redirect`). Kata Containers joins a VM's tap and a container's veth
//! this way; it needs no bridge, no addresses on the tap and no host routing.
//!
//! u32 rather than matchall: `cls_u32` is in every distribution kernel.

use super::{run_in, NetError, Netns};

/// Redirects every frame that arrives on `from` out of `to`. Adds the ingress qdisc of
/// `from` (and fails if it has one: it belongs to someone else).
pub fn redirect(netns: &Netns, from: &str, to: &str) -> Result<(), NetError> {
    run_in(netns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
    let filter = [
        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8",
        "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ];
    if let Err(e) = run_in(netns, "tc", &filter) {
        // Nothing left behind: the qdisc was ours.
        let _ = remove(netns, from);
        return Err(e);
    }
    Ok(())
}

/// Deletes the ingress qdisc of `dev`, and with it its filters.
pub fn remove(netns: &Netns, dev: &str) -> Result<(), NetError> {
    run_in(netns, "tc", &["qdisc", "del", "dev", dev, "ingress"]).map(drop)
}
