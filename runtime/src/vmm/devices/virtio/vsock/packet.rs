//! virtio-vsock packets (virtio 1.2, 5.10.6): a 44-byte little-endian header, then for
//! RW packets the payload.

use std::io::{self, Read, Write};

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// Largest payload accepted from the guest in one packet (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a larger `len` is a driver bug or an attack.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The only socket type offered (no VIRTIO_VSOCK_F_SEQPACKET).
pub const TYPE_STREAM: u16 = 1;

/// Operations (`op` field).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: what the sender of the packet will no longer do.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// Errors reading a packet from a descriptor chain or writing one into it.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PacketError {
    /// the chain holds {0} bytes, less than a header
    ShortHeader(usize),
    /// payload length {0} is above the maximum
    PayloadTooLong(u32),
    /// header says {len} payload bytes, the chain holds {available}
    ShortPayload { len: u32, available: usize },
    /// the chain has room for {room} bytes, the packet needs {needed}
    NoRoom { room: usize, needed: usize },
    /// guest memory access failed: {0}
    Memory(#[source] io::Error),
}

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A header and its payload (empty unless `op` is RW).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl Packet {
    /// Reads a packet the guest put in a TX chain; `available` is the number of readable
    /// bytes in the chain. Only RW packets carry a payload: other ops' bytes are ignored.
    pub fn read_from(reader: &mut impl Read, available: usize) -> Result<Self, PacketError> {
        if available < HEADER_SIZE {
            return Err(PacketError::ShortHeader(available));
        }
        let mut raw = [0u8; HEADER_SIZE];
        reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
        let hdr = Header::from_bytes(&raw);
        if hdr.op != op::RW {
            return Ok(Self {
                hdr,
                data: Vec::new(),
            });
        }
        if hdr.len as usize > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLong(hdr.len));
        }
        let room = available - HEADER_SIZE;
        if hdr.len as usize > room {
            return Err(PacketError::ShortPayload {
                len: hdr.len,
                available: room,
            });
        }
        let mut data = vec![0u8; hdr.len as usize];
        reader.read_exact(&mut data).map_err(PacketError::Memory)?;
        Ok(Self { hdr, data })
    }

    /// Writes the packet into an RX chain with `room` writable bytes; returns the bytes
    /// written (the `len` of the used element).
    pub fn write_to(&self, writer: &mut impl Write, room: usize) -> Result<u32, PacketError> {
        let needed = HEADER_SIZE + self.data.len();
        if needed > room {
            return Err(PacketError::NoRoom { room, needed });
        }
        let mut hdr = self.hdr;
        hdr.len = self.data.len() as u32;
        writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Memory)?;
        writer.write_all(&self.data).map_err(PacketError::Memory)?;
        Ok(needed as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_layout_is_the_spec_layout() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::from_bytes(&b), sample());
    }

    #[test]
    fn reads_and_writes_packets() {
        let pkt = Packet {
            hdr: sample(),
            data: b"hello".to_vec(),
        };
        let mut buf = Vec::new();
        assert_eq!(pkt.write_to(&mut buf, 100).unwrap(), 49);
        assert_eq!(Packet::read_from(&mut &buf[..], buf.len()).unwrap(), pkt);
        assert!(matches!(
            pkt.write_to(&mut Vec::new(), 48),
            Err(PacketError::NoRoom {
                room: 48,
                needed: 49
            })
        ));
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut hdr = sample();
        let b = hdr.to_bytes();
        assert!(matches!(
            Packet::read_from(&mut &b[..10], 10),
            Err(PacketError::ShortHeader(10))
        ));
        // Header claims 5 bytes, the chain has 2.
        let mut short = b.to_vec();
        short.extend_from_slice(b"ab");
        assert!(matches!(
            Packet::read_from(&mut &short[..], short.len()),
            Err(PacketError::ShortPayload {
                len: 5,
                available: 2
            })
        ));
        hdr.len = MAX_PAYLOAD as u32 + 1;
        let big = hdr.to_bytes();
        assert!(matches!(
            Packet::read_from(&mut &big[..], usize::MAX),
            Err(PacketError::PayloadTooLong(_))
        ));
        // A non-RW packet's len is not trusted for anything.
        hdr.op = op::CREDIT_REQUEST;
        let credit = hdr.to_bytes();
        let pkt = Packet::read_from(&mut &credit[..], HEADER_SIZE).unwrap();
        assert!(pkt.data.is_empty());
    }
}
