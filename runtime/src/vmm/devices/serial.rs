//! COM1: a 16550A UART from vm-superio on ports 0x3f8-0x3ff.
//!
//! Its interrupt is an `EventFd` registered as an irqfd on IRQ 4, so the guest console is
//! interrupt driven (polling the UART would cost an emulated exit per character).
//! Output goes to any `Write`: stdout, a file, the log, or a buffer in tests.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::trigger::EventFdTrigger;
use super::BusDevice;

/// Where COM1 is and which interrupt it raises.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Where the guest console goes.
#[derive(Clone)]
pub enum ConsoleOutput {
    /// The VMM's standard output (`husk vmm boot`).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// One `log::info!` line per console line (daemon mode).
    Log,
    /// Kept in memory (tests).
    Buffer(SharedBuffer),
    /// Dropped.
    Discard,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleOutput::Stdout => write!(f, "Stdout"),
            ConsoleOutput::File(p) => write!(f, "File({})", p.display()),
            ConsoleOutput::Log => write!(f, "Log"),
            ConsoleOutput::Buffer(_) => write!(f, "Buffer"),
            ConsoleOutput::Discard => write!(f, "Discard"),
        }
    }
}

impl ConsoleOutput {
    /// Opens the destination.
    pub fn into_writer(self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            ConsoleOutput::Stdout => Box::new(io::stdout()),
            ConsoleOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            ConsoleOutput::Log => Box::new(LogWriter::default()),
            ConsoleOutput::Buffer(buf) => Box::new(buf),
            ConsoleOutput::Discard => Box::new(io::sink()),
        })
    }
}

/// A byte buffer shared between the serial device and whoever reads the console.
#[derive(Clone, Default, Debug)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().expect("console buffer lock poisoned").clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .expect("console buffer lock poisoned")
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Collects console bytes into lines for the log.
#[derive(Default)]
struct LogWriter {
    line: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        for &b in data {
            if b == b'\n' {
                log::info!(target: "guest", "{}", String::from_utf8_lossy(&self.line).trim_end());
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART as a device on the port bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing the guest's output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(interrupt, out),
        }
    }

    /// Feeds host input (stdin) to the guest; returns how many bytes the FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl SerialDevice {
    /// The UART's registers and input FIFO (snapshots).
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }

    /// Takes the registers and input FIFO from `state`, keeping this device's interrupt
    /// and output (restore). A pending interrupt in `state` is raised again.
    pub fn restore_state(&mut self, state: &SerialState) -> io::Result<()> {
        let trigger = EventFdTrigger(self.serial.interrupt_evt().try_clone_fd()?);
        let placeholder = Serial::new(EventFdTrigger::new()?, Box::new(io::sink()) as _);
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(state, trigger, NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state rejected: {e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers; wider accesses read the register and zeros.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(offset, value) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    fn device() -> (SerialDevice, SharedBuffer, vmm_sys_util::eventfd::EventFd) {
        let trigger = EventFdTrigger::new().unwrap();
        let irq = trigger.try_clone_fd().unwrap();
        let out = SharedBuffer::default();
        (SerialDevice::new(trigger, Box::new(out.clone())), out, irq)
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut dev, out, _irq) = device();
        for b in b"hi\n" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(out.text(), "hi\n");
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_ne!(
            lsr[0] & 0x20,
            0,
            "transmitter holding register must read empty"
        );
    }

    #[test]
    fn transmit_raises_the_interrupt_when_enabled() {
        let (mut dev, _out, irq) = device();
        dev.write(THR, b"a");
        assert!(irq.read().is_err(), "no interrupt while IER is 0");
        dev.write(IER, &[0x02]); // THR-empty interrupt on
        dev.write(THR, b"b");
        assert_eq!(irq.read().unwrap(), 1);
        let mut iir = [0u8];
        dev.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR must say THR empty");
    }

    #[test]
    fn file_console_appends_what_the_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"earlier\n").unwrap();
        let trigger = EventFdTrigger::new().unwrap();
        let out = ConsoleOutput::File(path.clone()).into_writer().unwrap();
        let mut dev = SerialDevice::new(trigger, out);
        for b in b"guest\n" {
            dev.write(THR, &[*b]);
        }
        drop(dev);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\nguest\n");
    }

    #[test]
    fn state_moves_registers_and_pending_input_to_another_device() {
        let (mut a, _out_a, _irq_a) = device();
        a.write(IER, &[0x01]);
        a.write(7, &[0x5a]); // scratch register
        a.enqueue_input(b"qz");
        let (mut b, out_b, irq_b) = device();
        b.restore_state(&a.state()).unwrap();
        assert_eq!(
            irq_b.read().unwrap(),
            1,
            "pending input must interrupt again"
        );
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r[0], 0x5a);
        b.read(THR, &mut r);
        assert_eq!(&r, b"q");
        b.write(THR, b"!");
        assert_eq!(out_b.text(), "!", "output must still reach b's writer");
    }

    #[test]
    fn input_is_readable_and_interrupts() {
        let (mut dev, _out, irq) = device();
        dev.write(IER, &[0x01]); // received-data interrupt on
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        dev.read(LSR, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        dev.read(THR, &mut b);
        assert_eq!(&b, b"x");
    }
}
