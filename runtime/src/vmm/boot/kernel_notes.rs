//! What a guest kernel says about itself in its ELF notes, read before it is loaded.
//!
//! husk's guest kernel carries a note ("Husk", type 1, a version word) saying what it
//! reads from a husk VMM besides the command line: version 1, the husk platform leaves
//! ([`super::platform`], guest kernel patch 0021), so the VMM leaves `clearcpuid=` off
//! the PVM command line; version 2, also init's environment from a setup_data entry
//! (patch 0025, [`super::loader`]), so `GLIBC_TUNABLES=` leaves the line too. Each byte
//! of the command line costs the guest emulated instructions (it is parsed, copied and
//! printed at notice level). Any other kernel gets the full command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const PT_NOTE: u32 = 4;
/// Notes are small; a segment larger than this is not read.
const MAX_NOTES: u64 = 64 << 10;
const HUSK_NOTE_NAME: &[u8] = b"Husk\0";
const HUSK_NOTE_TYPE: u32 = 1;

/// What a kernel reads from a husk VMM besides its command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSupport {
    /// The husk platform leaves (note version 1, patch 0021).
    pub platform_leaves: bool,
    /// init's environment from husk's setup_data entry (note version 2, patch 0025).
    pub init_env_setup_data: bool,
}

impl KernelSupport {
    fn from_version(version: u32) -> Self {
        KernelSupport {
            platform_leaves: version >= 1,
            init_env_setup_data: version >= 2,
        }
    }
}

/// What the ELF kernel at `path` reads from a husk VMM. Anything unreadable counts as
/// nothing: loading the kernel reports what is wrong with the file.
pub fn kernel_support(path: &Path) -> KernelSupport {
    let version = File::open(path)
        .ok()
        .and_then(|mut f| note_segments(&mut f))
        .and_then(|segments| segments.iter().filter_map(|s| husk_note_version(s)).max())
        .unwrap_or(0);
    KernelSupport::from_version(version)
}

/// The contents of the ELF64 little-endian file's PT_NOTE segments.
fn note_segments(f: &mut File) -> Option<Vec<Vec<u8>>> {
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().ok()?);
    let phentsize = u16::from_le_bytes(eh[54..56].try_into().ok()?) as usize;
    let phnum = u16::from_le_bytes(eh[56..58].try_into().ok()?) as usize;
    if phentsize < 56 {
        return None;
    }
    let mut ph = vec![0u8; phentsize.checked_mul(phnum)?];
    f.seek(SeekFrom::Start(phoff)).ok()?;
    f.read_exact(&mut ph).ok()?;
    let mut segments = Vec::new();
    for p in ph.chunks_exact(phentsize) {
        if u32::from_le_bytes(p[0..4].try_into().ok()?) != PT_NOTE {
            continue;
        }
        let offset = u64::from_le_bytes(p[8..16].try_into().ok()?);
        let size = u64::from_le_bytes(p[32..40].try_into().ok()?);
        if size > MAX_NOTES {
            continue;
        }
        let mut data = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).ok()?;
        f.read_exact(&mut data).ok()?;
        segments.push(data);
    }
    Some(segments)
}

/// The version word of the note ("Husk", type 1) in a note segment, if it holds one.
fn husk_note_version(mut notes: &[u8]) -> Option<u32> {
    let word = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
    };
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while let (Some(namesz), Some(descsz), Some(kind)) =
        (word(notes, 0), word(notes, 4), word(notes, 8))
    {
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_end = 12 + align4(namesz);
        let end = name_end + align4(descsz);
        if end > notes.len() {
            return None;
        }
        if &notes[12..12 + namesz] == HUSK_NOTE_NAME && kind == HUSK_NOTE_TYPE && descsz >= 4 {
            return word(notes, name_end);
        }
        notes = &notes[end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    /// A minimal ELF64 file with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> tempfile::NamedTempFile {
        let mut eh = vec![0u8; 64];
        eh[..4].copy_from_slice(b"\x7fELF");
        eh[4] = 2;
        eh[5] = 1;
        eh[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        eh[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        eh[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let mut ph = vec![0u8; 56];
        ph[0..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[32..40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&eh).unwrap();
        f.write_all(&ph).unwrap();
        f.write_all(notes).unwrap();
        f
    }

    fn support_of(notes: &[u8]) -> KernelSupport {
        kernel_support(elf_with_notes(notes).path())
    }

    #[test]
    fn finds_the_husk_note_among_others_and_reads_its_version() {
        let husk = |version: u32| {
            let mut notes = note(b"Xen\0", 18, &[1, 2, 3, 4, 5, 6, 7, 8]);
            notes.extend(note(b"Husk\0", 1, &version.to_le_bytes()));
            support_of(&notes)
        };
        assert_eq!(
            husk(1),
            KernelSupport {
                platform_leaves: true,
                init_env_setup_data: false
            }
        );
        assert_eq!(
            husk(2),
            KernelSupport {
                platform_leaves: true,
                init_env_setup_data: true
            }
        );
        assert_eq!(husk(0), KernelSupport::default());
    }

    #[test]
    fn other_notes_other_types_and_non_elf_files_are_no() {
        let none = KernelSupport::default();
        let linux = note(b"Linux\0", 1, &1u32.to_le_bytes());
        assert_eq!(support_of(&linux), none);
        let wrong_type = note(b"Husk\0", 2, &1u32.to_le_bytes());
        assert_eq!(support_of(&wrong_type), none);
        let truncated = &note(b"Husk\0", 1, &1u32.to_le_bytes())[..14];
        assert_eq!(support_of(truncated), none);
        let mut text = tempfile::NamedTempFile::new().unwrap();
        text.write_all(b"not an elf").unwrap();
        assert_eq!(kernel_support(text.path()), none);
        assert_eq!(kernel_support(Path::new("/nonexistent/vmlinux")), none);
    }
}
