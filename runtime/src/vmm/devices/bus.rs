//! A bus maps guest address ranges (I/O ports or MMIO) to devices.
//!
//! vCPU threads look up the device for each port/MMIO exit and call it with the offset
//! inside the device's range, so a device never needs to know where it was placed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes within its range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors placing devices on a bus.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum BusError {
    /// range {base:#x}+{len:#x} overlaps a device already on the bus
    Overlap { base: u64, len: u64 },
    /// range at {0:#x} has zero length
    ZeroLength(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space (ports or MMIO) with devices at non-overlapping ranges.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<Range, SharedDevice>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps = self
            .devices
            .keys()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(Range { base, len }, device);
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    pub fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (range, dev) = self
            .devices
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        let offset = addr - range.base;
        (offset < range.len).then_some((dev, offset))
    }

    /// Routes a read; returns false when no device is there (the guest reads all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b, [7]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(a.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(d.clone(), 0xf0, 0x11),
            Err(BusError::Overlap {
                base: 0xf0,
                len: 0x11
            })
        );
        assert_eq!(
            bus.insert(d.clone(), 0x50, 0),
            Err(BusError::ZeroLength(0x50))
        );
        bus.insert(d, 0x110, 1).unwrap();
    }
}
