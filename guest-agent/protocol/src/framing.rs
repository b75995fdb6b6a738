//! Frames: a `u32` big-endian payload length, then that many bytes of JSON.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a
//! corrupt or hostile peer cannot make the other side allocate gigabytes.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest payload either side accepts (an OCI spec is a few KiB).
pub const MAX_FRAME_LEN: u32 = 4 << 20;

/// Errors reading or writing one frame.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum FrameError {
    /// the peer closed the connection
    Closed,
    /// frame of {len} bytes is larger than the maximum of {max} bytes (corrupt stream or peer of another version?)
    TooLarge { len: u64, max: u32 },
    /// frame I/O failed: {0}
    Io(#[from] io::Error),
    /// frame payload is not a valid message: {0}
    Decode(#[source] serde_json::Error),
    /// message could not be encoded: {0}
    Encode(#[source] serde_json::Error),
}

/// Writes `msg` as one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let payload = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max: MAX_FRAME_LEN,
        })?;
    // One write for header and payload: one syscall (and one vsock packet) per frame.
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. A clean end of stream before the header is [`FrameError::Closed`].
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    serde_json::from_slice(&payload).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::messages::{ExitStatus, ProcessRef, Request, Response, StdioPorts, StdioRequest};
    use crate::AgentError;

    fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
        let mut buf = Vec::new();
        write_frame(&mut buf, msg).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4, "header must hold the payload length");
        read_frame(&mut Cursor::new(buf)).unwrap()
    }

    fn sample_requests() -> Vec<Request> {
        let spec = oci_spec::runtime::Spec::default();
        let process = spec.process().clone().unwrap();
        let init = ProcessRef {
            container_id: "c1".into(),
            exec_id: None,
        };
        let exec = ProcessRef {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
        };
        vec![
            Request::Hello { version: 7 },
            Request::Ping,
            Request::CreateContainer {
                id: "c1".into(),
                spec: Box::new(spec),
                rootfs: "/run/rootfs".into(),
                stdio: StdioRequest { stdin: true },
                pod_sandbox: None,
            },
            Request::CreateContainer {
                id: "m1".into(),
                spec: Box::new(oci_spec::runtime::Spec::default()),
                rootfs: "/run/m1".into(),
                stdio: StdioRequest::default(),
                pod_sandbox: Some("c1".into()),
            },
            Request::StartContainer { id: "c1".into() },
            Request::ExecProcess {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                process: Box::new(process),
                stdio: StdioRequest::default(),
            },
            Request::SignalProcess {
                process: exec.clone(),
                signal: 9,
            },
            Request::WaitProcess {
                process: init.clone(),
            },
            Request::ResizePty {
                process: exec,
                rows: 24,
                cols: 80,
            },
            Request::Stats {
                container_id: "c1".into(),
            },
            Request::DeleteContainer {
                id: "c1".into(),
                force: true,
            },
            Request::Shutdown,
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for request in sample_requests() {
            assert_eq!(round_trip(&request), request);
        }
    }

    #[test]
    fn every_response_round_trips() {
        let responses = vec![
            Response::Hello { version: 1 },
            Response::Pong,
            Response::Spawned {
                pid: 42,
                stdio: StdioPorts {
                    stdin: Some(1025),
                    stdout: Some(1026),
                    stderr: None,
                    pty: None,
                },
            },
            Response::Done,
            Response::Exited {
                status: ExitStatus::Exited(3),
            },
            Response::Exited {
                status: ExitStatus::Signaled(9),
            },
            Response::Stats {
                stats: serde_json::json!({"pids": {"current": 1}}),
            },
            Response::Error {
                error: AgentError::ContainerNotFound { id: "nope".into() },
            },
            Response::Error {
                error: AgentError::VersionMismatch { host: 2, agent: 1 },
            },
        ];
        for response in responses {
            assert_eq!(round_trip(&response), response);
        }
    }

    #[test]
    fn oversize_header_is_rejected_before_allocating() {
        let mut buf = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let err = read_frame::<_, Request>(&mut Cursor::new(buf)).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == u64::from(MAX_FRAME_LEN) + 1),
            "{err}"
        );
    }

    #[test]
    fn oversize_message_is_not_written() {
        let mut spec = oci_spec::runtime::Spec::default();
        let big = "x".repeat(MAX_FRAME_LEN as usize);
        spec.set_hostname(Some(big));
        let request = Request::CreateContainer {
            id: "c".into(),
            spec: Box::new(spec),
            rootfs: "/".into(),
            stdio: StdioRequest::default(),
            pod_sandbox: None,
        };
        let mut out = Vec::new();
        let err = write_frame(&mut out, &request).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(out.is_empty(), "nothing may reach the stream");
    }

    #[test]
    fn clean_eof_is_closed_and_torn_frames_are_io_errors() {
        let err = read_frame::<_, Request>(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");

        let err = read_frame::<_, Request>(&mut Cursor::new(vec![0, 0])).unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");

        let mut torn = 10u32.to_be_bytes().to_vec();
        torn.extend_from_slice(b"{\"ty");
        let err = read_frame::<_, Request>(&mut Cursor::new(torn)).unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");
    }

    #[test]
    fn unknown_message_is_a_decode_error() {
        let payload = br#"{"type":"format_disk"}"#;
        let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(payload);
        let err = read_frame::<_, Request>(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }
}
