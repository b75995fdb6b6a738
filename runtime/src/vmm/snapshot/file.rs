//! The snapshot file: a fixed binary header, the VM state as JSON, then guest RAM.
//!
//! ```text
//! 0    magic "HUSKSNAP" | format version (u32 LE) | header length (u32 LE)
//! 16   configuration fingerprint (32 bytes, see fingerprint.rs)
//! 48   state length (u64) | SHA-256 of the state (32 bytes)
//! 88   memory offset (u64, page aligned) | memory length (u64)
//! 128  state: JSON of `VmSnapshot`
//! ...  guest RAM from the memory offset, zero pages left as holes
//! ```
//!
//! The state is JSON because it is small (tens of KiB, next to megabytes of RAM), is read
//! once per restore, and can be inspected with `jq` when a restore goes wrong; what must be
//! compact is the memory, and that is raw pages mapped straight from the file. The
//! version is bumped whenever the state's meaning changes; an older or newer file is
//! refused rather than guessed at (a template is rebuilt, which is cheap next to running a
//! guest from misread state). The hash catches a damaged state section, the length checks
//! a truncated file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::fingerprint::Fingerprint;
use super::memory::{write_sparse, PAGE_SIZE};
use super::{SnapshotError, VmSnapshot};
use vm_memory::GuestMemoryMmap;

pub const MAGIC: &[u8; 8] = b"HUSKSNAP";
/// Bump when the layout or the meaning of any state field changes.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub fingerprint: Fingerprint,
    pub state_len: u64,
    pub state_sha256: [u8; 32],
    pub mem_offset: u64,
    pub mem_len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..48].copy_from_slice(&self.fingerprint.0);
        b[48..56].copy_from_slice(&self.state_len.to_le_bytes());
        b[56..88].copy_from_slice(&self.state_sha256);
        b[88..96].copy_from_slice(&self.mem_offset.to_le_bytes());
        b[96..104].copy_from_slice(&self.mem_len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, SnapshotError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION || u32_at(12) as usize != HEADER_LEN {
            return Err(SnapshotError::Version {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Self {
            version,
            fingerprint: Fingerprint(b[16..48].try_into().expect("32 bytes")),
            state_len: u64_at(48),
            state_sha256: b[56..88].try_into().expect("32 bytes"),
            mem_offset: u64_at(88),
            mem_len: u64_at(96),
        })
    }
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Writes the snapshot to `path` atomically: into `path.partial`, synced, then renamed, so
/// a crash never leaves a file that looks complete.
pub fn write(
    path: &Path,
    fingerprint: Fingerprint,
    state: &VmSnapshot,
    mem: &GuestMemoryMmap,
) -> Result<Header, SnapshotError> {
    let json = serde_json::to_vec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mem_offset = align_up((HEADER_LEN + json.len()) as u64);
    let header = Header {
        version: FORMAT_VERSION,
        fingerprint,
        state_len: json.len() as u64,
        state_sha256: Sha256::digest(&json).into(),
        mem_offset,
        mem_len: state.mem_size,
    };
    let partial = path.with_extension("partial");
    let io = |what: &'static str| {
        let p = partial.clone();
        move |source| SnapshotError::Io {
            what,
            path: p,
            source,
        }
    };
    let mut file = File::create(&partial).map_err(io("creating"))?;
    file.write_all(&header.encode()).map_err(io("writing"))?;
    file.write_all(&json).map_err(io("writing"))?;
    let stored = write_sparse(&file, mem_offset, mem)?;
    if stored != state.mem_size {
        return Err(SnapshotError::Inconsistent(format!(
            "guest memory is {stored} bytes but the state says {}",
            state.mem_size
        )));
    }
    file.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&partial, path).map_err(|source| SnapshotError::Io {
        what: "renaming the finished snapshot to",
        path: path.to_owned(),
        source,
    })?;
    Ok(header)
}

/// Reads only the header (e.g. to compare fingerprints before building a VM).
pub fn read_header(path: &Path) -> Result<(Header, File), SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::Io {
        what: "opening",
        path: path.to_owned(),
        source,
    })?;
    let mut b = [0u8; HEADER_LEN];
    file.read_exact_at(&mut b, 0)
        .map_err(|_| SnapshotError::Truncated("the header"))?;
    Ok((Header::decode(&b)?, file))
}

/// Reads and checks the header and the state; the file stays open for mapping RAM.
pub fn read(path: &Path) -> Result<(Header, VmSnapshot, File), SnapshotError> {
    let (header, file) = read_header(path)?;
    let file_len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            what: "reading the metadata of",
            path: path.to_owned(),
            source,
        })?
        .len();
    let state_end = (HEADER_LEN as u64)
        .checked_add(header.state_len)
        .filter(|&end| end <= header.mem_offset && end <= file_len)
        .ok_or(SnapshotError::Truncated("the VM state"))?;
    let mut json = vec![0u8; (state_end - HEADER_LEN as u64) as usize];
    file.read_exact_at(&mut json, HEADER_LEN as u64)
        .map_err(|_| SnapshotError::Truncated("the VM state"))?;
    if <[u8; 32]>::from(Sha256::digest(&json)) != header.state_sha256 {
        return Err(SnapshotError::StateChecksum);
    }
    let state: VmSnapshot =
        serde_json::from_slice(&json).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if !header.mem_offset.is_multiple_of(PAGE_SIZE) || header.mem_len != state.mem_size {
        return Err(SnapshotError::Inconsistent(format!(
            "memory at offset {:#x} of {} bytes, state says {} bytes",
            header.mem_offset, header.mem_len, state.mem_size
        )));
    }
    match header.mem_offset.checked_add(header.mem_len) {
        Some(end) if end == file_len => {}
        Some(end) if end > file_len => return Err(SnapshotError::Truncated("guest memory")),
        _ => {
            return Err(SnapshotError::Inconsistent(format!(
                "the file is {file_len} bytes, the header describes {} + {}",
                header.mem_offset, header.mem_len
            )))
        }
    }
    Ok((header, state, file))
}
