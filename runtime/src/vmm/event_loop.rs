//! A small epoll loop: the VMM thread waits here for vCPU stops, the guest's reset, the
//! ready signal and console input. It knows nothing about what the events mean.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Errors of the event loop.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum EventLoopError {
    /// creating the epoll instance failed: {0}
    Create(std::io::Error),
    /// watching fd {fd} failed: {source}
    Add { fd: RawFd, source: std::io::Error },
    /// waiting for events failed: {0}
    Wait(std::io::Error),
    /// {0}; the VM does not run unconfined
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Which fds are watched, each with a caller-chosen token.
pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    pub fn new() -> Result<Self, EventLoopError> {
        Ok(Self {
            epoll: Epoll::new().map_err(EventLoopError::Create)?,
        })
    }

    /// Watches `fd` for input; `token` identifies it in [`EventLoop::wait`].
    pub fn add(&self, fd: RawFd, token: u64) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|source| EventLoopError::Add { fd, source })
    }

    /// Stops watching `fd` (e.g. stdin at end of file).
    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Waits until an fd is readable or `deadline` passes; returns the ready tokens
    /// (empty on timeout).
    pub fn wait(&self, deadline: Option<Instant>) -> Result<Vec<u64>, EventLoopError> {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline and spin.
                i32::try_from(left.as_millis() + u128::from(left > Duration::ZERO))
                    .unwrap_or(i32::MAX)
            }
        };
        let mut events = [EpollEvent::default(); 8];
        loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => return Ok(events[..n].iter().map(EpollEvent::data).collect()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Wait(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn reports_the_token_of_a_ready_fd_and_times_out_otherwise() {
        let lp = EventLoop::new().unwrap();
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        lp.add(a.as_raw_fd(), 1).unwrap();
        lp.add(b.as_raw_fd(), 2).unwrap();
        let t0 = Instant::now();
        assert!(lp
            .wait(Some(t0 + Duration::from_millis(30)))
            .unwrap()
            .is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(30));
        b.write(1).unwrap();
        assert_eq!(lp.wait(None).unwrap(), vec![2]);
        lp.remove(b.as_raw_fd());
        assert!(lp.wait(Some(Instant::now())).unwrap().is_empty());
    }
}
