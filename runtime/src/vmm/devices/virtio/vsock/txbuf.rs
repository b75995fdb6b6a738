//! A bounded FIFO of bytes the guest sent that the host socket has not taken yet.

use std::collections::VecDeque;
use std::io::{self, Write};

/// Holds at most `capacity` bytes; the connection advertises that capacity to the guest as
/// its buf_alloc, so a guest that respects credit never overflows it.
#[derive(Debug)]
pub struct TxBuf {
    bytes: VecDeque<u8>,
    capacity: usize,
}

/// The buffer has no room for the bytes offered.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl TxBuf {
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends `data` whole, or nothing.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Full> {
        if self.bytes.len() + data.len() > self.capacity {
            return Err(Full);
        }
        self.bytes.extend(data);
        Ok(())
    }

    /// Writes buffered bytes, oldest first, until `w` would block or the buffer is empty.
    /// Returns how many bytes left the buffer.
    pub fn flush_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut total = 0;
        while !self.bytes.is_empty() {
            let (head, _) = self.bytes.as_slices();
            match w.write(head) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.bytes.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts at most `room` bytes, then would block.
    struct Trickle {
        out: Vec<u8>,
        room: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room).min(3);
            self.out.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_and_ordered_across_partial_flushes() {
        let mut tx = TxBuf::new(8);
        tx.push(b"abcde").unwrap();
        assert_eq!(tx.push(b"fghi"), Err(Full));
        let mut sink = Trickle {
            out: Vec::new(),
            room: 4,
        };
        assert_eq!(tx.flush_to(&mut sink).unwrap(), 4);
        tx.push(b"fghij").unwrap();
        assert_eq!(tx.len(), 6);
        sink.room = 100;
        assert_eq!(tx.flush_to(&mut sink).unwrap(), 6);
        assert!(tx.is_empty());
        assert_eq!(sink.out, b"abcdefghij");
    }
}
