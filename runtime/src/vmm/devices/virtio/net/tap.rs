//! A tap device: the host end of the guest's NIC.
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: Ethernet frames with no packet-info
//! prefix, each preceded by a `virtio_net_hdr_v1` (12 bytes). That header is the same one
//! the guest puts before every frame on its queues, so frames cross between the tap and the
//! virtqueues without translation, and checksum/segmentation offloads pass through.
//!
//! The tap is not persistent: it disappears with the last fd, so a crashed VMM leaves no
//! tap behind. `IFF_TUN_EXCL` makes creating a name that exists fail instead of silently
//! attaching to someone else's tap.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `virtio_net_hdr_v1`, the header before every frame (virtio 1.2, 5.1.6).
pub const VNET_HDR_LEN: usize = 12;

/// Errors of the tap device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TapError {
    /// tap name {0:?} is invalid: it must be 1 to 15 bytes, without '/', whitespace or NUL
    InvalidName(String),
    /// cannot open /dev/net/tun (is the tun module loaded and the device node present?): {0}
    OpenTun(#[source] io::Error),
    /// cannot create tap {name} (EBUSY means an interface of that name exists; EPERM needs CAP_NET_ADMIN): {source}
    Create { name: String, source: io::Error },
    /// tap {name}: {what} failed: {source}
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` with the name and the flags member, as TUNSETIFF takes it.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    // The kernel copies a whole `struct ifreq` (40 bytes on 64-bit).
    _pad: [u8; 22],
}

impl Tap {
    /// Creates the tap `name` in the calling thread's network namespace, non-blocking,
    /// with the virtio-net header, little-endian header fields and no offloads yet.
    pub fn create(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
                as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq-sized struct, which `req` is and
        // which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Create {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        tap.set_int(
            "TUNSETVNETHDRSZ",
            libc::TUNSETVNETHDRSZ,
            VNET_HDR_LEN as i32,
        )?;
        // virtio 1.x headers are little endian whatever the host is.
        tap.set_int("TUNSETVNETLE", libc::TUNSETVNETLE, 1)?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A second fd on the same tap (same queue): the VM's device takes one while the
    /// sandbox keeps the tap's owner, whose fd lives as long as the sandbox.
    pub fn try_clone(&self) -> Result<Self, TapError> {
        let file = self.file.try_clone().map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            what: "dup",
            source,
        })?;
        Ok(Self {
            file,
            name: self.name.clone(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads the kernel may use in frames it gives us (`TUN_F_*`): with
    /// `TUN_F_CSUM` it may hand over frames whose checksum is still to be computed
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`); with `TUN_F_TSO4` frames larger than the MTU.
    /// Only what the guest accepted may be set here.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }

    fn set_int(&self, what: &'static str, req: libc::Ioctl, value: i32) -> Result<(), TapError> {
        let value: libc::c_int = value;
        // SAFETY: these requests read one c_int through the pointer, which is valid for
        // the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &value) };
        self.check(rc, what)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
