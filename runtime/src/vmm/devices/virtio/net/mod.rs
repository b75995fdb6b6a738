//! virtio-net (virtio 1.2, 5.1) with a tap backend.
//!
//! - [`tap`]: the tap device (created inside the container's network namespace by
//!   [`crate::net`]).
//! - [`device`]: the virtio device: queues, config space, frames between queues and tap.
//! - [`event_handler`]: what the VMM event loop polls and calls.
//! - [`rate_limiter`]: the hook for rate limiting; no limiter exists yet.

pub mod device;
pub mod event_handler;
pub mod rate_limiter;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::{Net, NetConfig, NetError, NetStats};
pub use event_handler::NetEvent;
pub use tap::{Tap, TapError};

/// Largest frame (without the virtio-net header) either direction handles: a 64 KiB TSO
/// segment plus Ethernet and VLAN headers, as Linux's `VIRTIO_NET_MAX_GSO` buffers hold.
pub const MAX_FRAME_LEN: usize = 65_550;

/// Which offloads the device offers, and why.
///
/// Every guest-kernel instruction is expensive where husk runs under PVM (emulated), and
/// cheap enough on real hardware, so per-byte work in the guest is what to avoid:
/// - `CSUM`: the guest may send frames with a partial checksum; the tap (or the host NIC)
///   completes it. Saves the guest a pass over every byte it sends.
/// - `HOST_TSO4`: the guest may send TCP segments of up to 64 KiB; the host kernel splits
///   them after the tap. One trip through the guest stack per 64 KiB instead of per MTU.
///   Requires `CSUM` (5.1.3.1). The tap accepts any valid GSO frame without setup.
/// - `GUEST_CSUM`: we may give the guest frames whose checksum is not filled in (the
///   host produced them and the checksum never matters on this virtual wire) or mark
///   them as verified, so the guest does not verify them. Turns on `TUN_F_CSUM`.
///
/// - `GUEST_TSO4`: we may give the guest TCP segments of up to 64 KiB (a peer's TSO/GSO
///   packet crosses the veth, the redirect and the tap whole). Linux then posts 64 KiB RX
///   buffers ("big packets": a chain of pages per buffer, no `MRG_RXBUF` needed), and
///   receives one segment where it would take up to ~45 frames. Requires `GUEST_CSUM`
///   (5.1.3.1); turns on `TUN_F_TSO4`. Measured on a PVM host (bench/net.sh): no gain
///   (1.4 Mbit/s with it, 1.95 without, on a loaded machine): at the rates an emulated
///   guest kernel reaches, the sender's TSO autosizing makes segments of ~2 MSS, so the
///   per-packet cost stays. It pays off where the guest is fast (hardware KVM).
///
/// Not offered, on purpose:
/// - `GUEST_TSO6`, `GUEST_UFO`, `GUEST_ECN`: no IPv6 in the guest; UFO is gone; ECN
///   with TSO adds nothing here.
/// - `HOST_TSO6`, `HOST_UFO`, `HOST_ECN`: the guest kernel has no IPv6; UFO is gone from
///   Linux; ECN with TSO adds nothing here.
/// - `CTRL_VQ`, `MQ`: no control queue, one queue pair; the MAC is fixed by the host.
/// - `MRG_RXBUF`, `EVENT_IDX`, `INDIRECT_DESC`: possible later speedups, each needs care.
pub mod offload {
    use virtio_bindings::virtio_net as vn;

    pub const CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
    pub const GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
    pub const HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
    pub const MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
    pub const MTU: u64 = 1 << vn::VIRTIO_NET_F_MTU;
    pub const STATUS: u64 = 1 << vn::VIRTIO_NET_F_STATUS;

    /// Device features besides VERSION_1.
    pub const OFFERED: u64 = CSUM | GUEST_CSUM | GUEST_TSO4 | HOST_TSO4 | MAC | MTU | STATUS;

    /// The tap offloads (`TUN_F_*`) that match the features the driver accepted: only
    /// what the guest can take may come out of the tap.
    pub fn tap_flags(acked: u64) -> u32 {
        if acked & GUEST_CSUM == 0 {
            return 0;
        }
        if acked & GUEST_TSO4 != 0 {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        } else {
            libc::TUN_F_CSUM
        }
    }
}
