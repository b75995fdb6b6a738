//! The driver side of a split virtqueue, for tests: it lays out the rings in guest memory,
//! publishes descriptor chains and collects used entries, as a guest driver would.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_SIZE: u64 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// One buffer of a chain: where it is, how long, and whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub device_writes: bool,
}

/// A split virtqueue as the driver sees it.
pub struct DriverQueue {
    mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
}

impl DriverQueue {
    /// Rings for `size` entries laid out from `base` (16-byte aligned); they end before
    /// `base + size * 32 + 64`.
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + DESC_SIZE * u64::from(size));
        let avail_end = avail.0 + 6 + 2 * u64::from(size);
        let used = GuestAddress((avail_end + 3) & !3);
        mem.write_obj(0u16, avail).unwrap();
        mem.write_obj(0u16, GuestAddress(avail.0 + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used.0 + 2)).unwrap();
        Self {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).rev().collect(),
        }
    }

    /// Number of descriptors not in any published chain.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes the chain into the descriptor table and publishes its head in the avail ring.
    /// Returns the head index, or None when the table has no room.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, (buf, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if buf.device_writes {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let at = self.desc.0 + DESC_SIZE * u64::from(id);
            self.mem.write_obj(buf.addr.0, GuestAddress(at)).unwrap();
            self.mem.write_obj(buf.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(ids[0], GuestAddress(self.avail.0 + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
        Some(ids[0])
    }

    /// The next used entry (head index, bytes written), freeing its descriptors.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap();
        if used_idx == self.used_seen {
            return None;
        }
        let at = self.used.0 + 4 + 8 * u64::from(self.used_seen % self.size);
        let head: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let mut id = head as u16;
        loop {
            self.free.push(id);
            let d = self.desc.0 + DESC_SIZE * u64::from(id);
            let flags: u16 = self.mem.read_obj(GuestAddress(d + 12)).unwrap();
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            id = self.mem.read_obj(GuestAddress(d + 14)).unwrap();
        }
        Some((head as u16, len))
    }

    /// A `virtio_queue::Queue` configured at this queue's rings, ready, as a transport
    /// would hand it to a device.
    pub fn device_queue(&self) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(self.desc).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        q
    }
}
