//! The `CONNECT <port>\n` line a host client sends before its stream starts.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;

/// Longest line accepted ("CONNECT 4294967295\n" is 19 bytes).
const MAX_LINE: usize = 32;

/// Where reading the line stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The client asked for this guest port.
    Connect(u32),
    /// The line is not complete yet.
    Pending,
    /// EOF, an I/O error, or not a valid line: drop the client.
    Failed,
}

/// A host client that has not yet sent its whole CONNECT line.
#[derive(Debug)]
pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
}

impl Handshake {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            line: Vec::new(),
        }
    }

    /// Reads what the client sent so far. Reads one byte at a time so that no stream byte
    /// after the newline is consumed here.
    pub fn advance(&mut self) -> Progress {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Progress::Failed,
                Ok(_) if byte[0] == b'\n' => return parse(&self.line),
                Ok(_) if self.line.len() >= MAX_LINE => return Progress::Failed,
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Failed,
            }
        }
    }
}

fn parse(line: &[u8]) -> Progress {
    let port = std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok());
    port.map_or(Progress::Failed, Progress::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn handshake_of(bytes: &[u8]) -> (Handshake, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.write_all(bytes).unwrap();
        (Handshake::new(ours), theirs)
    }

    #[test]
    fn parses_the_line_and_leaves_the_stream_bytes() {
        let (mut h, mut client) = handshake_of(b"CONN");
        assert_eq!(h.advance(), Progress::Pending);
        client.write_all(b"ECT 1024\nrest").unwrap();
        assert_eq!(h.advance(), Progress::Connect(1024));
        let mut rest = [0u8; 4];
        h.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[test]
    fn rejects_bad_lines() {
        for bad in [
            &b"CONNECT x\n"[..],
            b"CONNECT 4294967296\n",
            b"connect 5\n",
            b"CONNECT  5\n",
            &[b'A'; 40][..],
        ] {
            let (mut h, _client) = handshake_of(bad);
            assert_eq!(
                h.advance(),
                Progress::Failed,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let (mut h, client) = handshake_of(b"CONNECT 5");
        drop(client);
        assert_eq!(h.advance(), Progress::Failed, "EOF before the newline");
    }
}
