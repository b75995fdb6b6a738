//! The i8042 keyboard controller, only for its CPU-reset line: with `reboot=k` Linux
//! reboots (and so powers off a husk guest) by writing 0xFE to port 0x64. The VMM ends
//! the VM cleanly when the reset eventfd fires.

use vm_superio::I8042Device;

use super::trigger::EventFdTrigger;
use super::BusDevice;

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// The controller on the port bus.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty and input buffer free, so Linux's kb_wait() passes.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(offset, value) {
                log::error!("i8042: signalling the guest reset failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_the_reset_event_and_nothing_else_does() {
        let trigger = EventFdTrigger::new().unwrap();
        let reset = trigger.try_clone_fd().unwrap();
        let mut dev = I8042::new(trigger);
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]); // a command, but not reset
        assert!(reset.read().is_err());
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        dev.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
