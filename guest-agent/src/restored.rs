//! `RefreshAfterRestore`: a guest restored from a snapshot gets the host's wall-clock time
//! and fresh entropy.
//!
//! Every guest restored from one template resumes with the template's clock and the
//! template's random-generator state: without this, two sandboxes would produce the same
//! "random" bytes (keys, UUIDs, TCP sequence numbers). The host sends bytes from its own
//! generator; they are mixed in with `RNDADDENTROPY` (credited, so the kernel counts them)
//! and `RNDRESEEDCRNG` then makes the kernel's generator (and every per-CPU one derived
//! from it) reseed at once instead of at its next scheduled reseed.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use husk_protocol::{AgentError, Response};

/// Fewer bytes than this could not reseed the generator fully (it keys with 32).
const MIN_ENTROPY: usize = 32;
/// One request's bound, well above what a reseed needs.
const MAX_ENTROPY: usize = 4096;

/// `struct rand_pool_info` of <linux/random.h>, with its buffer inline.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

// RNDADDENTROPY is _IOW('R', 0x03, int[2]): the size names the header, the buffer follows.
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()),
    RandPoolInfo
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

pub fn refresh(realtime_ns: u64, entropy: &[u8]) -> Result<Response, AgentError> {
    if std::process::id() != 1 {
        return Err(AgentError::Unsupported {
            what: "RefreshAfterRestore outside a VM (it would set the host's clock)".into(),
        });
    }
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        return Err(AgentError::InvalidRequest {
            reason: format!(
                "{} bytes of entropy: send {MIN_ENTROPY} to {MAX_ENTROPY}",
                entropy.len()
            ),
        });
    }
    let io = |context: &str, e: nix::Error| AgentError::Io {
        context: context.to_owned(),
        message: e.to_string(),
    };
    let now = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `now` is a valid timespec that outlives the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) };
    nix::Error::result(rc).map_err(|e| io("setting the clock", e))?;

    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| AgentError::Io {
            context: "opening /dev/urandom".into(),
            message: e.to_string(),
        })?;
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    // SAFETY: `info` is a valid rand_pool_info whose buf_size bytes follow its header,
    // and it outlives the call; the fd is open.
    unsafe { rnd_add_entropy(random.as_raw_fd(), &info) }
        .map_err(|e| io("adding entropy (RNDADDENTROPY)", e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    unsafe { rnd_reseed_crng(random.as_raw_fd()) }
        .map_err(|e| io("reseeding the generator (RNDRESEEDCRNG)", e))?;
    Ok(Response::Done)
}
