//! Pods: the shim serves all containers of a pod from one instance (the CRI sandbox id
//! picks the socket); the husk library runs a pod's members in its sandbox
//! ([`husk::sandbox::pod`]).

pub use husk::sandbox::pod::{annotations, Role};
