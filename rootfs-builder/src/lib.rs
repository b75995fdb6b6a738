//! husk-rootfs: the guest initramfs and root disk image, demo/test OCI bundles and OCI
//! image tarballs.
//!
//! Every output is made from a [`tree::Tree`], an in-memory description of a root
//! filesystem, so the outputs stay consistent and deterministic.

pub mod bundle;
pub mod busybox;
pub mod elf;
pub mod image;
pub mod initramfs;
pub mod root_disk;
pub mod tree;
