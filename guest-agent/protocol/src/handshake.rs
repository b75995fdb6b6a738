//! The `Hello` exchange that opens every control connection.
//!
//! The host sends `Hello{its version}`; the agent answers `Hello{its version}` when they
//! match and `Error{VersionMismatch}` when not, then closes. Both sides thus report the
//! same clear error, and nothing else is decoded across a version boundary.

use std::io::{Read, Write};

use crate::error::AgentError;
use crate::framing::{read_frame, write_frame, FrameError};
use crate::messages::{Request, Response};

/// Errors of the handshake, on either side.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HandshakeError {
    /// handshake framing failed: {0}
    Frame(#[from] FrameError),
    /// handshake refused: {0}
    Refused(AgentError),
    /// unexpected handshake reply: {0}
    Unexpected(String),
}

/// Host side: sends our version and checks the agent's reply.
pub fn client_hello<S: Read + Write>(stream: &mut S, version: u32) -> Result<(), HandshakeError> {
    write_frame(stream, &Request::Hello { version })?;
    match read_frame(stream)? {
        Response::Hello { version: agent } if agent == version => Ok(()),
        Response::Hello { version: agent } => {
            Err(HandshakeError::Refused(AgentError::VersionMismatch {
                host: version,
                agent,
            }))
        }
        Response::Error { error } => Err(HandshakeError::Refused(error)),
        other => Err(HandshakeError::Unexpected(format!("{other:?}"))),
    }
}

/// Agent side: reads the host's `Hello` and answers it. On a mismatch the host has been
/// told, and the error is returned so the agent can log it and close the connection.
pub fn server_hello<S: Read + Write>(stream: &mut S, version: u32) -> Result<(), HandshakeError> {
    let error = match read_frame(stream)? {
        Request::Hello { version: host } if host == version => {
            write_frame(stream, &Response::Hello { version })?;
            return Ok(());
        }
        Request::Hello { version: host } => AgentError::VersionMismatch {
            host,
            agent: version,
        },
        other => AgentError::HandshakeRequired {
            got: other.name().to_owned(),
        },
    };
    write_frame(
        stream,
        &Response::Error {
            error: error.clone(),
        },
    )?;
    Err(HandshakeError::Refused(error))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::*;

    /// Runs the agent's side with `agent_version` in a thread, the host's with `host_version`.
    fn exchange(
        host_version: u32,
        agent_version: u32,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || server_hello(&mut agent, agent_version));
        let client = client_hello(&mut host, host_version);
        (client, server.join().unwrap())
    }

    #[test]
    fn same_version_succeeds_on_both_sides() {
        let (client, server) = exchange(3, 3);
        client.unwrap();
        server.unwrap();
    }

    #[test]
    fn version_mismatch_is_the_same_clear_error_on_both_sides() {
        let (client, server) = exchange(2, 1);
        let expected = AgentError::VersionMismatch { host: 2, agent: 1 };
        for result in [client, server] {
            match result {
                Err(HandshakeError::Refused(e)) => {
                    assert_eq!(e, expected);
                    assert!(
                        e.to_string().contains("host speaks 2, the agent speaks 1"),
                        "{e}"
                    );
                }
                other => panic!("expected a version mismatch, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_request_before_hello_is_refused() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || server_hello(&mut agent, 1));
        write_frame(&mut host, &Request::Ping).unwrap();
        let reply: Response = read_frame(&mut host).unwrap();
        let expected = AgentError::HandshakeRequired { got: "ping".into() };
        assert_eq!(
            reply,
            Response::Error {
                error: expected.clone()
            }
        );
        assert!(matches!(server.join().unwrap(), Err(HandshakeError::Refused(e)) if e == expected));
    }
}
