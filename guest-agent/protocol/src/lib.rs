//! The contract between the husk host side and `husk-agent` in the guest.
//!
//! Both sides depend on this crate, so a constant or message changed here changes on both.
//!
//! - [`boot`]: how the guest signals it has booted.
//! - [`messages`]: the requests and responses on the control port, and [`PROTOCOL_VERSION`].
//! - [`error`]: the typed errors the agent returns to the host.
//! - [`framing`]: `u32` big-endian length + JSON frames over any `Read + Write`.
//! - [`handshake`]: the `Hello` exchange that turns a version mismatch into a clear error.
//! - [`client`]: the host side: [`client::AgentClient`] and the [`connector::Connector`]s
//!   that reach the agent's ports (Unix directory for tier 2, hybrid vsock for real VMs).

pub mod client;
pub mod connector;
pub mod error;
pub mod framing;
pub mod handshake;
pub mod messages;

pub use error::AgentError;
pub use messages::{ExitStatus, Request, Response, StdioPorts, PROTOCOL_VERSION};

/// The vsock port the agent's control server listens on.
pub const CONTROL_PORT: u32 = 1024;

/// How the guest tells the VMM it has finished booting.
///
/// The agent writes [`boot::READY_MAGIC`] to I/O port [`boot::READY_PORT`] once it is
/// ready, as Firecracker's boot timer does with its magic MMIO write. The agent runs in
/// guest user space, so it writes through `/dev/port`: the guest kernel then executes the
/// `out` instruction, which exits to the VMM as a port write.
pub mod boot {
    /// I/O port the VMM watches for the ready signal (unused by any legacy PC device).
    pub const READY_PORT: u16 = 0x0440;
    /// Value written to [`READY_PORT`] when the agent is ready.
    pub const READY_MAGIC: u8 = 123;
    /// Variable of the agent's (init's) environment: set to `1`, the agent powers the
    /// VM off right after signalling ready (used by `husk vmm boot` and boot
    /// benchmarks). The VMM passes it as a `NAME=value` kernel argument, which reaches
    /// init's environment from the command line or, for husk's own guest kernel, from
    /// husk's setup_data entry (no command-line bytes for the guest to parse).
    pub const ENV_POWEROFF_AFTER_READY: &str = "HUSK_POWEROFF_AFTER_READY";
}
