//! Helpers shared by husk's integration tests.

pub mod cli;
pub mod docker;
pub mod engines;
pub mod guest_asm;
pub mod netns;
pub mod procfs;
pub mod vm_lock;
pub mod vmm;
