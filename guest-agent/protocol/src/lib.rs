//! The contract between the husk host side and `husk-agent` in the guest.
//!
//! Both sides depend on this crate, so a constant or message changed here changes on both.

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
    /// Kernel command-line key: when present, the agent powers the VM off right after
    /// signalling ready (used by `husk vmm boot` and boot benchmarks).
    pub const CMDLINE_POWEROFF_AFTER_READY: &str = "husk.poweroff_after_ready";
}
