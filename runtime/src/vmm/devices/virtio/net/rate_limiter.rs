//! The rate-limiting hook of the net device. No limiter is implemented yet: a device
//! without one ([`None`] in [`Net`](super::Net)) forwards everything at once.
//!
//! Where the device asks: before it hands a frame to the tap (TX) and before it puts a
//! received frame into a guest buffer (RX). A refusal never loses a frame: on TX the
//! descriptor chain goes back to the queue, on RX the frame stays pending and the device
//! stops reading the tap. A real limiter (a token bucket per direction, as Firecracker's)
//! will also need a timer fd among the device's event sources, so that the device retries
//! when tokens are back; that is not done.

/// Decides whether a frame may pass now.
pub trait RateLimiter: Send {
    /// May a frame of `bytes` pass now? `true` consumes its budget.
    fn consume(&mut self, bytes: u64) -> bool;
}
