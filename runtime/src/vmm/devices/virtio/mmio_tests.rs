//! Tests of the virtio-mmio transport, with a small echo device behind it.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::vmm::devices::virtio::interrupt::reason;
use crate::vmm::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use crate::vmm::devices::virtio::{ActivateError, VirtioDevice};

const DEVICE_TYPE: u32 = 0x7f;
/// A device-specific feature the echo device offers (bit 3) besides VERSION_1.
const F_ECHO_UPPER: u64 = 1 << 3;
const MAX_SIZES: [u16; 2] = [16, 8];

/// Echoes what the driver puts in a chain's readable part into its writable part,
/// upper-cased. Config space: 4 writable bytes then 4 read-only bytes.
struct EchoDevice {
    events: Vec<EventFd>,
    acked: Option<u64>,
    config: [u8; 8],
    activations: usize,
    resets: usize,
    active: Option<(GuestMemoryMmap, Arc<Interrupt>, Vec<Queue>)>,
}

impl EchoDevice {
    fn new() -> Self {
        Self {
            events: MAX_SIZES
                .iter()
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            acked: None,
            config: [1, 2, 3, 4, 0xa, 0xb, 0xc, 0xd],
            activations: 0,
            resets: 0,
            active: None,
        }
    }

    /// Handles all chains available on queue `index`; returns how many.
    fn process(&mut self, index: usize) -> usize {
        let (mem, irq, queues) = self.active.as_mut().expect("not active");
        let q = &mut queues[index];
        let mut done = 0;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut input = Vec::new();
            chain
                .clone()
                .reader(mem)
                .unwrap()
                .read_to_end(&mut input)
                .unwrap();
            let mut out = chain.writer(mem).unwrap();
            out.write_all(&input.to_ascii_uppercase()).unwrap();
            q.add_used(mem, head, input.len() as u32).unwrap();
            done += 1;
        }
        if done > 0 {
            irq.signal_used_buffer().unwrap();
        }
        done
    }
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &MAX_SIZES
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }
    fn avail_features(&self) -> u64 {
        features::VERSION_1 | F_ECHO_UPPER
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.config[..4].get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != MAX_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: MAX_SIZES.len(),
                got: queues.len(),
            });
        }
        self.activations += 1;
        self.active = Some((mem, interrupt, queues));
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.acked = None;
        self.active = None;
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<EchoDevice>>,
    t: MmioTransport,
}

fn fixture() -> Fixture {
    let mem = guest_memory(0x10_0000);
    let dev = Arc::new(Mutex::new(EchoDevice::new()));
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    Fixture { mem, dev, t }
}

fn r(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}

/// Status steps up to FEATURES_OK with `features` accepted; returns the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    w(
        t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    for sel in 0..2 {
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        w(
            t,
            reg::VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * sel)) as u32,
        );
    }
    w(
        t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    r(t, reg::VIRTIO_MMIO_STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, q: &DriverQueue) {
    w(t, reg::VIRTIO_MMIO_QUEUE_SEL, index);
    assert_eq!(r(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(u32::from(q.size) <= r(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX));
    w(t, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
    for (lo, hi, addr) in [
        (
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
            q.desc,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            q.avail,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_USED_LOW,
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
            q.used,
        ),
    ] {
        w(t, lo, addr.0 as u32);
        w(t, hi, (addr.0 >> 32) as u32);
    }
    w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

/// The whole driver init sequence; returns the driver's view of both queues.
fn bring_up(f: &mut Fixture) -> (DriverQueue, DriverQueue) {
    assert_eq!(
        negotiate(&mut f.t, features::VERSION_1) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    let q0 = DriverQueue::new(&f.mem, GuestAddress(0x1000), 16);
    let q1 = DriverQueue::new(&f.mem, GuestAddress(0x2000), 8);
    setup_queue(&mut f.t, 0, &q0);
    setup_queue(&mut f.t, 1, &q1);
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
    (q0, q1)
}

#[test]
fn identity_registers() {
    let mut f = fixture();
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(f.t.device_type(), DEVICE_TYPE);
    w(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
        F_ECHO_UPPER as u32
    );
    w(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    // VERSION_1 is bit 32, so bit 0 of the high word.
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
    w(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "no such queue"
    );
}

#[test]
fn init_sequence_activates_exactly_once() {
    let mut f = fixture();
    bring_up(&mut f);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), ALL_OK);
    assert_eq!(f.dev.lock().unwrap().activations, 1);
    assert_eq!(f.dev.lock().unwrap().acked, Some(features::VERSION_1));
    // Writing the same status again does not activate twice.
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(f.dev.lock().unwrap().activations, 1);
    // Queue registers are frozen after DRIVER_OK.
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn feature_negotiation_accepts_only_subsets_with_version_1() {
    let offered = features::VERSION_1 | F_ECHO_UPPER;
    for (accepted, ok) in [
        (features::VERSION_1 | F_ECHO_UPPER, true),
        (features::VERSION_1, true),
        (F_ECHO_UPPER, false),                   // legacy driver
        (features::VERSION_1 | (1 << 5), false), // never offered
        (offered | (1 << 40), false),            // never offered, high word
    ] {
        let mut f = fixture();
        let st = negotiate(&mut f.t, accepted);
        assert_eq!(st & status::FEATURES_OK != 0, ok, "features {accepted:#x}");
        assert_eq!(f.dev.lock().unwrap().acked, ok.then_some(accepted));
    }
    // A bit in a third feature word is never offered either.
    let mut f = fixture();
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    w(&mut f.t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    w(&mut f.t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    assert_eq!(
        negotiate(&mut f.t, features::VERSION_1) & status::FEATURES_OK,
        0
    );
}

#[test]
fn features_are_frozen_after_features_ok() {
    let mut f = fixture();
    negotiate(&mut f.t, features::VERSION_1);
    w(&mut f.t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_DRIVER_FEATURES,
        F_ECHO_UPPER as u32,
    );
    assert_eq!(f.dev.lock().unwrap().acked, Some(features::VERSION_1));
}

#[test]
fn status_steps_out_of_order_are_ignored() {
    let mut f = fixture();
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, status::DRIVER);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), 0);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::FEATURES_OK,
    );
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), status::ACKNOWLEDGE);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // Clearing a bit is not allowed either (only 0, a reset).
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, status::DRIVER);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    assert_eq!(f.dev.lock().unwrap().activations, 0);
    // FAILED sticks until reset, and nothing moves after it.
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, ALL_OK | status::FAILED);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
}

#[test]
fn queue_registers_need_features_ok() {
    let mut f = fixture();
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
}

/// Brings the device up with queue 0 changed by `spoil` after a valid setup; returns the
/// status and the interrupt status the driver then reads.
fn bring_up_with(spoil: impl FnOnce(&mut MmioTransport)) -> (Fixture, u32, u32) {
    let mut f = fixture();
    negotiate(&mut f.t, features::VERSION_1);
    let q0 = DriverQueue::new(&f.mem, GuestAddress(0x1000), 16);
    let q1 = DriverQueue::new(&f.mem, GuestAddress(0x2000), 8);
    setup_queue(&mut f.t, 0, &q0);
    setup_queue(&mut f.t, 1, &q1);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    spoil(&mut f.t);
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
    let st = r(&mut f.t, reg::VIRTIO_MMIO_STATUS);
    let isr = r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS);
    (f, st, isr)
}

#[test]
fn invalid_queues_fail_activation_with_needs_reset() {
    type Spoiler = Box<dyn FnOnce(&mut MmioTransport)>;
    let spoilers: [(&str, Spoiler); 6] = [
        (
            "not ready",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_READY, 0)),
        ),
        (
            "size not a power of two",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 12)),
        ),
        (
            "size above max",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 32)),
        ),
        (
            "size zero",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 0)),
        ),
        (
            "misaligned descriptors",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008)),
        ),
        (
            "used ring outside memory",
            Box::new(|t| w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 1)),
        ),
    ];
    for (what, spoil) in spoilers {
        let (f, st, isr) = bring_up_with(spoil);
        assert_eq!(st, ALL_OK | status::DEVICE_NEEDS_RESET, "{what}");
        assert_eq!(isr, reason::CONFIG_CHANGE, "{what}");
        assert_eq!(f.dev.lock().unwrap().activations, 0, "{what}");
    }
    // The same sequence without spoiling activates: the spoilers are what fails.
    let (f, st, _) = bring_up_with(|_| {});
    assert_eq!(st, ALL_OK);
    assert_eq!(f.dev.lock().unwrap().activations, 1);
}

#[test]
fn device_refusal_sets_needs_reset() {
    // A device whose queue count disagrees with the transport's refuses activation.
    struct Refuser(EchoDevice);
    impl VirtioDevice for Refuser {
        fn device_type(&self) -> u32 {
            self.0.device_type()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            self.0.queue_max_sizes()
        }
        fn queue_events(&self) -> &[EventFd] {
            self.0.queue_events()
        }
        fn avail_features(&self) -> u64 {
            self.0.avail_features()
        }
        fn ack_features(&mut self, features: u64) {
            self.0.ack_features(features)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.0.read_config(offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0.write_config(offset, data)
        }
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            irq: Arc<Interrupt>,
            mut queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            queues.pop();
            self.0.activate(mem, irq, queues)
        }
        fn reset(&mut self) {
            self.0.reset()
        }
    }
    let mem = guest_memory(0x10_0000);
    let dev = Arc::new(Mutex::new(Refuser(EchoDevice::new())));
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut f = Fixture {
        mem,
        dev: Arc::new(Mutex::new(EchoDevice::new())),
        t,
    };
    bring_up(&mut f);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_STATUS),
        ALL_OK | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(dev.lock().unwrap().0.activations, 0);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    bring_up(&mut f);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    f.t.interrupt().signal_used_buffer().unwrap();
    f.t.config_changed().unwrap();
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        reason::USED_BUFFER | reason::CONFIG_CHANGE
    );
    assert_eq!(f.t.interrupt().irq_evt().read().unwrap(), 2);
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_INTERRUPT_ACK,
        reason::USED_BUFFER,
    );
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        reason::CONFIG_CHANGE
    );
    w(
        &mut f.t,
        reg::VIRTIO_MMIO_INTERRUPT_ACK,
        reason::CONFIG_CHANGE,
    );
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn reset_returns_to_initial_state_and_allows_new_activation() {
    let mut f = fixture();
    bring_up(&mut f);
    f.t.interrupt().signal_used_buffer().unwrap();
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    {
        let dev = f.dev.lock().unwrap();
        assert_eq!(dev.resets, 1);
        assert!(dev.active.is_none());
    }
    bring_up(&mut f);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), ALL_OK);
    assert_eq!(f.dev.lock().unwrap().activations, 2);
}

#[test]
fn config_space_and_generation() {
    let mut f = fixture();
    let mut b4 = [0u8; 4];
    f.t.read(0x100, &mut b4);
    assert_eq!(b4, [1, 2, 3, 4]);
    f.t.write(0x101, &[9]);
    f.t.write(0x104, &[0xee; 4]); // read-only field: ignored by the device
    let mut b8 = [0u8; 8];
    f.t.read(0x100, &mut b8);
    assert_eq!(b8, [1, 9, 3, 4, 0xa, 0xb, 0xc, 0xd]);
    f.t.read(0x106, &mut b4);
    assert_eq!(
        b4,
        [0xc, 0xd, 0, 0],
        "bytes past the config space read as zero"
    );
    let g0 = r(&mut f.t, reg::VIRTIO_MMIO_CONFIG_GENERATION);
    f.t.config_changed().unwrap();
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_CONFIG_GENERATION),
        g0.wrapping_add(1)
    );
}

#[test]
fn unknown_and_write_only_registers_read_zero_and_writes_are_dropped() {
    let mut f = fixture();
    for off in [0x28, 0x40, 0x80, 0xc0, 0xf8, 0x50, 0x64] {
        assert_eq!(r(&mut f.t, off), 0, "offset {off:#x}");
    }
    // No shared memory regions: length -1.
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    w(&mut f.t, reg::VIRTIO_MMIO_MAGIC_VALUE, 0);
    w(&mut f.t, 0xe0, 0x1234);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
}

#[test]
fn register_accesses_must_be_32_bit_aligned() {
    // 4.2.2.2: the driver MUST use 32-bit wide, aligned accesses for registers; anything
    // else is dropped (writes) or reads as zero.
    let mut f = fixture();
    let mut b2 = [0xffu8; 2];
    f.t.read(0, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    f.t.read(2, &mut b4);
    assert_eq!(b4, [0; 4]);
    f.t.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[1]);
    f.t.write(
        u64::from(reg::VIRTIO_MMIO_STATUS),
        &[1, 0, 0, 0, 0, 0, 0, 0],
    );
    f.t.write(u64::from(reg::VIRTIO_MMIO_STATUS) + 2, &[1, 0, 0, 0]);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), 0);
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, 1);
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), 1);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut f = fixture();
    let fds = f.t.queue_notify_eventfds().unwrap();
    assert_eq!(fds.len(), 2);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
    assert!(fds[0].read().is_err());
    assert_eq!(fds[1].read().unwrap(), 1);
}

#[test]
fn queue_round_trip() {
    let mut f = fixture();
    let (mut q0, _q1) = bring_up(&mut f);
    let notify = f.t.queue_notify_eventfds().unwrap();
    let irq = f.t.interrupt().clone();

    let (req, resp) = (GuestAddress(0x8000), GuestAddress(0x9000));
    f.mem.write_slice(b"hello, ", req).unwrap();
    f.mem
        .write_slice(b"virtio", GuestAddress(req.0 + 0x100))
        .unwrap();
    let head = q0
        .add_chain(&[
            Buf {
                addr: req,
                len: 7,
                device_writes: false,
            },
            Buf {
                addr: GuestAddress(req.0 + 0x100),
                len: 6,
                device_writes: false,
            },
            Buf {
                addr: resp,
                len: 64,
                device_writes: true,
            },
        ])
        .unwrap();
    w(&mut f.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    // What the event loop does: wait for the queue's eventfd, let the device work.
    assert_eq!(notify[0].read().unwrap(), 1);
    assert_eq!(f.dev.lock().unwrap().process(0), 1);

    assert_eq!(q0.pop_used(), Some((head, 13)));
    assert_eq!(q0.pop_used(), None);
    let mut out = [0u8; 13];
    f.mem.read_slice(&mut out, resp).unwrap();
    assert_eq!(&out, b"HELLO, VIRTIO");
    assert_eq!(irq.irq_evt().read().unwrap(), 1);
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        reason::USED_BUFFER
    );
    assert_eq!(q0.free_descriptors(), 16);
    // Nothing more to do until the driver publishes another chain.
    assert_eq!(f.dev.lock().unwrap().process(0), 0);
}

#[test]
fn deferred_activation_runs_only_when_the_event_loop_asks() {
    let mut f = fixture();
    let due = f.t.defer_activation().unwrap();
    bring_up(&mut f);
    // The driver sees DRIVER_OK accepted at once, but the device is not activated on
    // the writing (vCPU) thread: the eventfd says an activation is due.
    assert_eq!(r(&mut f.t, reg::VIRTIO_MMIO_STATUS), ALL_OK);
    assert_eq!(f.dev.lock().unwrap().activations, 0);
    assert_eq!(due.read().unwrap(), 1);
    assert!(f.t.activate_pending().unwrap());
    assert_eq!(f.dev.lock().unwrap().activations, 1);
    // Nothing pending any more.
    assert!(!f.t.activate_pending().unwrap());
    assert_eq!(f.dev.lock().unwrap().activations, 1);
}

#[test]
fn deferred_activation_dropped_by_a_reset_and_failure_sets_needs_reset() {
    let mut f = fixture();
    let _due = f.t.defer_activation().unwrap();
    bring_up(&mut f);
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, 0);
    assert!(!f.t.activate_pending().unwrap(), "a reset cancels it");
    assert_eq!(f.dev.lock().unwrap().activations, 0);
    // Queue 1 never made ready: the deferred activation fails like a synchronous one.
    assert_eq!(
        negotiate(&mut f.t, features::VERSION_1) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    let q0 = DriverQueue::new(&f.mem, GuestAddress(0x1000), 16);
    setup_queue(&mut f.t, 0, &q0);
    w(&mut f.t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
    let err = f.t.activate_pending().unwrap_err();
    assert!(err.to_string().contains("queue 1"), "{err}");
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_STATUS),
        ALL_OK | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(
        r(&mut f.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & reason::CONFIG_CHANGE,
        reason::CONFIG_CHANGE
    );
}

/// One readable "ab" buffer and a writable one on `q`; returns the head.
fn echo_chain(mem: &GuestMemoryMmap, q: &mut DriverQueue, at: u64) -> u16 {
    mem.write_slice(b"ab", GuestAddress(at)).unwrap();
    q.add_chain(&[
        Buf {
            addr: GuestAddress(at),
            len: 2,
            device_writes: false,
        },
        Buf {
            addr: GuestAddress(at + 0x100),
            len: 16,
            device_writes: true,
        },
    ])
    .unwrap()
}

#[test]
fn restored_transport_activates_its_device_where_the_rings_are() {
    let mut f = fixture();
    let (mut q0, _q1) = bring_up(&mut f);
    f.t.activate_pending().unwrap();
    echo_chain(&f.mem, &mut q0, 0x8000);
    assert_eq!(f.dev.lock().unwrap().process(0), 1);
    assert!(q0.pop_used().is_some());
    let state = f.t.state();
    assert!(state.active);
    assert_eq!(state.status, ALL_OK);

    // A new transport and device over the same memory (what a restore builds).
    let dev = Arc::new(Mutex::new(EchoDevice::new()));
    let mut t = MmioTransport::new(f.mem.clone(), dev.clone()).unwrap();
    t.restore_state(&state).unwrap();
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ALL_OK);
    assert_eq!(dev.lock().unwrap().activations, 1);
    assert_eq!(dev.lock().unwrap().acked, Some(features::VERSION_1));
    assert_eq!(
        t.interrupt().irq_evt().read().unwrap(),
        1,
        "a restore re-raises the interrupt"
    );
    // The first chain is not processed twice; the next one is.
    assert_eq!(dev.lock().unwrap().process(0), 0);
    let head = echo_chain(&f.mem, &mut q0, 0x9000);
    assert_eq!(dev.lock().unwrap().process(0), 1);
    assert_eq!(q0.pop_used(), Some((head, 2)));

    // A snapshot of another device type is refused.
    let mut other = state.clone();
    other.device_type += 1;
    let dev = Arc::new(Mutex::new(EchoDevice::new()));
    let mut t = MmioTransport::new(f.mem.clone(), dev).unwrap();
    assert!(t.restore_state(&other).unwrap_err().contains("device type"));
}
