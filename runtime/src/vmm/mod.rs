//! The virtual machine monitor: one KVM microVM per sandbox.

pub mod devices;
