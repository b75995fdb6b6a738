//! Helpers shared by husk's integration tests.

pub mod engines;
pub mod guest_asm;
pub mod vmm;
