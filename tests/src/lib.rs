//! Helpers shared by husk's integration tests.

pub mod engines;
pub mod guest_asm;
pub mod vm_lock;
pub mod vmm;
