//! husk: OCI containers in KVM microVMs.
//!
//! The library does the work; `src/main.rs` and `src/cli/` are a thin command line over it.

pub mod artifacts;
pub mod daemon;
pub mod host;
pub mod inspect;
pub mod jailer;
pub mod net;
pub mod oci;
pub mod sandbox;
pub mod seccomp;
pub mod vmm;
