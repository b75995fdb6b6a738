//! The host side of the vsock device: Unix domain sockets ("hybrid vsock").
//!
//! - A host client connects to the VM's socket (`vsock.sock`), writes `CONNECT <port>\n`
//!   and, once the guest accepted, reads `OK <host port>\n`; after that the socket carries
//!   the stream's bytes.
//! - A guest connection to port P is connected to the listener at `<vsock.sock>_P`.

mod handshake;
pub mod muxer;

pub use muxer::{Muxer, MuxerError};
