//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs,
//! the IOAPIC and how ISA interrupts are routed. The guest kernel has X86_MPPARSE and no
//! ACPI, so without this table it sees one CPU and no IOAPIC.
//!
//! Layout, at the start of the EBDA (0x9fc00, one of the places Linux scans): the 16-byte
//! floating pointer, then the configuration table header and its entries.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::devices::serial::COM1_IRQ;
use crate::vmm::memory::{APIC_START, EBDA_START, IOAPIC_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MptableError {
    /// {0} vCPUs do not fit in the MP table area; at most 32 are supported
    TooManyCpus(u8),
    /// writing the MP table into guest memory failed: {0}
    Write(vm_memory::GuestMemoryError),
}

/// IOAPIC pins, each wired to the ISA/GSI interrupt of the same number.
pub const IOAPIC_PINS: u8 = 24;
/// The ISA interrupts (0-15), routed whether or not a device uses them when the guest has a
/// legacy PIC: Linux then preallocates them as legacy IRQs anyway, and checks the timer on
/// pin 0.
const ISA_IRQS: u8 = 16;
/// The table must end before 0xa0000 (1 KiB of EBDA).
pub const MAX_VCPUS: u8 = 32;
const TABLE_AREA: usize = 0x400;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU, APIC
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn processor_entry(apic_id: u8) -> Vec<u8> {
    let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
    let mut e = vec![0, apic_id, APIC_VERSION, flags];
    e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
    e.extend_from_slice(&[0; 8]);
    e
}

fn interrupt_entry(kind: u8, int_type: u8, src_irq: u8, dst_id: u8, dst_pin: u8) -> [u8; 8] {
    // flags 0: polarity and trigger mode conform to the bus (ISA: active high, edge).
    [kind, int_type, 0, 0, 0, src_irq, dst_id, dst_pin]
}

/// The whole table for `num_cpus` vCPUs (floating pointer first) as it must appear at
/// [`EBDA_START`]. With a `legacy_pic` the ISA pins are routed, and pins above them only
/// when a device is wired to them (`device_irqs`); without one (the husk platform leaves
/// say so, [`super::platform`]) only the serial console's pin and the devices' pins are:
/// the guest kernel maps, and gives a sysfs and a procfs directory to, every routed pin,
/// ~30000 emulated instructions each.
pub fn build(num_cpus: u8, device_irqs: &[u32], legacy_pic: bool) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        entries.extend(processor_entry(id));
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    let ioapic_addr = (IOAPIC_START as u32).to_le_bytes();
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&ioapic_addr);
    count += 2;
    let routed = (0..IOAPIC_PINS).filter(|&pin| {
        let pin = u32::from(pin);
        (legacy_pic && pin < u32::from(ISA_IRQS)) || pin == COM1_IRQ || device_irqs.contains(&pin)
    });
    for irq in routed {
        entries.extend(interrupt_entry(3, INT_TYPE_INT, irq, ioapic_id, irq));
        count += 1;
    }
    // Virtual wire: the 8259 on LINT0, NMI on LINT1 of every local APIC (0xff).
    entries.extend(interrupt_entry(4, INT_TYPE_EXTINT, 0, 0xff, 0));
    entries.extend(interrupt_entry(4, INT_TYPE_NMI, 0, 0xff, 1));
    count += 2;

    let header_len = 44;
    let table_len = (header_len + entries.len()) as u16;
    let table_addr = (EBDA_START + 16) as u32;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum below
    table.extend_from_slice(b"HUSK    "); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&[0; 4]); // no OEM table
    table.extend_from_slice(&[0; 2]);
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0]); // length in 16-byte units, revision 1.4, checksum
    fp.extend_from_slice(&[0; 5]); // feature byte 1 = 0: a configuration table is present
    fp[10] = checksum(&fp);
    fp.extend(table);
    if fp.len() > TABLE_AREA {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    Ok(fp)
}

/// Writes the MP table for `num_cpus` vCPUs and devices on `device_irqs` into guest memory.
pub fn write(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    device_irqs: &[u32],
    legacy_pic: bool,
) -> Result<(), MptableError> {
    let table = build(num_cpus, device_irqs, legacy_pic)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let t = build(2, &[], true).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, EBDA_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_each_cpu_with_the_first_as_boot_processor() {
        let t = build(3, &[], true).unwrap();
        let table = &t[16..];
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 3 + 2 + 16 + 2);
        let cpus: Vec<(u8, u8)> = (0..3)
            .map(|i| (table[44 + 20 * i + 1], table[44 + 20 * i + 3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        // IOAPIC entry right after the CPUs and the bus: id follows the last APIC id.
        let ioapic = &table[44 + 60 + 8..];
        assert_eq!((ioapic[0], ioapic[1]), (2, 3));
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()) as u64,
            IOAPIC_START
        );
    }

    #[test]
    fn refuses_more_cpus_than_fit() {
        let every_pin: Vec<u32> = (0..u32::from(IOAPIC_PINS)).collect();
        assert!(build(MAX_VCPUS, &every_pin, true).unwrap().len() <= TABLE_AREA);
        let err = build(MAX_VCPUS + 1, &[], true).unwrap_err().to_string();
        assert!(err.contains("at most 32"), "{err}");
        assert!(build(0, &[], true).is_err());
    }

    /// The (source IRQ, destination pin) of each IOAPIC interrupt entry.
    fn routed_pins(t: &[u8], num_cpus: usize) -> Vec<(u8, u8)> {
        let table = &t[16..];
        let mut at = 44 + 20 * num_cpus + 8 + 8;
        let mut pins = Vec::new();
        while at < table.len() && table[at] == 3 {
            pins.push((table[at + 5], table[at + 7]));
            at += 8;
        }
        pins
    }

    #[test]
    fn routes_the_isa_pins_and_only_the_used_pins_above() {
        let isa: Vec<(u8, u8)> = (0..16).map(|p| (p, p)).collect();
        assert_eq!(routed_pins(&build(1, &[], true).unwrap(), 1), isa);
        // Devices inside the ISA range add nothing; a device on pin 19 adds pin 19 alone.
        assert_eq!(routed_pins(&build(1, &[5, 6], true).unwrap(), 1), isa);
        let mut with_19 = isa.clone();
        with_19.push((19, 19));
        assert_eq!(routed_pins(&build(2, &[5, 19], true).unwrap(), 2), with_19);
    }

    #[test]
    fn without_a_legacy_pic_only_the_serial_and_the_devices_pins_are_routed() {
        assert_eq!(routed_pins(&build(1, &[], false).unwrap(), 1), [(4, 4)]);
        assert_eq!(
            routed_pins(&build(2, &[5, 6, 19], false).unwrap(), 2),
            [(4, 4), (5, 5), (6, 6), (19, 19)]
        );
    }
}
