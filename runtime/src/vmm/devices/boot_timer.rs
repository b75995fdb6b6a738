//! The boot timer: the guest writes [`READY_MAGIC`] to port [`READY_PORT`] once it is
//! ready (the agent does, through /dev/port), and the VMM records how long that took since
//! it started, as Firecracker's boot-timer device does with its magic MMIO write.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use husk_protocol::boot::{READY_MAGIC, READY_PORT};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const BOOT_TIMER_PORT: u64 = READY_PORT as u64;
pub const BOOT_TIMER_LEN: u64 = 1;

/// When the guest became ready, shared with the VMM.
pub type ReadyTime = Arc<OnceLock<Duration>>;

/// The device on the port bus.
pub struct BootTimer {
    start: Instant,
    ready_at: ReadyTime,
    ready_evt: EventFd,
}

impl BootTimer {
    /// A timer counting from `start`; `ready_evt` is written once, on the first ready signal.
    pub fn new(start: Instant, ready_evt: EventFd) -> Self {
        Self {
            start,
            ready_at: ReadyTime::default(),
            ready_evt,
        }
    }

    /// The time to ready, once the guest has signalled it.
    pub fn ready_time(&self) -> ReadyTime {
        self.ready_at.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&READY_MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.ready_at.set(elapsed).is_ok() {
            log::info!("guest ready after {} ms", elapsed.as_millis());
            if let Err(e) = self.ready_evt.write(1) {
                log::error!("boot timer: signalling ready failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_value_counts_and_only_once() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut timer = BootTimer::new(Instant::now(), evt.try_clone().unwrap());
        let ready = timer.ready_time();
        timer.write(0, &[READY_MAGIC.wrapping_add(1)]);
        assert!(ready.get().is_none());
        assert!(evt.read().is_err());
        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[READY_MAGIC]);
        let first = *ready.get().unwrap();
        assert!(first >= Duration::from_millis(5));
        assert_eq!(evt.read().unwrap(), 1);
        timer.write(0, &[READY_MAGIC]);
        assert_eq!(*ready.get().unwrap(), first);
        assert!(evt.read().is_err(), "a second ready must not signal again");
    }
}
