//! Helpers shared by husk's integration tests.

pub mod guest_asm;
pub mod vmm;
