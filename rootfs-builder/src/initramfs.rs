//! The guest initramfs: an uncompressed newc cpio with the static agent as `/init`.
//!
//! Uncompressed because unpacking gzip in the emulated guest kernel costs seconds
//! (shared/substrate.md). Deterministic: entries sorted, uid/gid 0, mtime 0, inode numbers
//! counted from 1 in archive order.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::elf::{self, ElfError};
use crate::tree::{Kind, Tree, TreeError};

/// Errors building the initramfs. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum InitramfsError {
    /// the agent cannot be `/init`: {0} (build it with `-C target-feature=+crt-static`)
    Agent(ElfError),
    /// `--add {spec}`: expected SRC:DEST, for example `./rootfs:/rootfs`
    AddSpec { spec: String },
    /// `--add {spec}`: {source}
    Add { spec: String, source: TreeError },
    /// {0}
    Tree(#[from] TreeError),
    /// `{path}` is {size} bytes, over the 4 GiB newc limit
    TooLarge { path: PathBuf, size: u64 },
    /// `{path}` changed size while being archived; archive it again
    Changed { path: PathBuf },
    /// writing the cpio archive failed: {0}
    Write(#[from] io::Error),
}

/// Directories the agent mounts on or writes to before anything else exists.
const AGENT_DIRS: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/mnt"];

/// The console, so the kernel can give PID 1 its stdio before devtmpfs is mounted.
const CONSOLE: (&str, u32, u32) = ("/dev/console", 5, 1);

/// One `--add SRC:DEST` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddSpec {
    pub src: PathBuf,
    pub dest: String,
}

impl std::str::FromStr for AddSpec {
    type Err = InitramfsError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        // Split at the last colon: host paths with colons are rarer than guest ones.
        match spec.rsplit_once(':') {
            Some((src, dest)) if !src.is_empty() && !dest.is_empty() => Ok(AddSpec {
                src: PathBuf::from(src),
                dest: dest.to_string(),
            }),
            _ => Err(InitramfsError::AddSpec {
                spec: spec.to_string(),
            }),
        }
    }
}

/// Describes the initramfs: agent, the agent's directories, the console, then `adds`
/// (which may add to or replace what came before).
pub fn tree(agent: &Path, adds: &[AddSpec]) -> Result<Tree, InitramfsError> {
    elf::require_static(agent).map_err(InitramfsError::Agent)?;
    let mut tree = Tree::new();
    tree.add_host_file("/init", 0o755, agent)?;
    for dir in AGENT_DIRS {
        tree.add_dir(dir, 0o755)?;
    }
    // /tmp is world-writable and sticky, as on any Linux system.
    tree.add_dir("/tmp", 0o1777)?;
    let (console, major, minor) = CONSOLE;
    tree.add_char_device(console, 0o600, major, minor)?;
    for add in adds {
        tree.add_host_path(&add.src, &add.dest)
            .map_err(|source| InitramfsError::Add {
                spec: format!("{}:{}", add.src.display(), add.dest),
                source,
            })?;
    }
    Ok(tree)
}

/// Writes `tree` as a newc cpio archive and returns the writer.
pub fn write_cpio<W: Write>(tree: &Tree, mut out: W) -> Result<W, InitramfsError> {
    for (ino, (path, node)) in (1u32..).zip(tree.iter()) {
        let name = path.to_str().ok_or_else(|| TreeError::BadGuestPath {
            path: path.display().to_string(),
            reason: "cpio names must be UTF-8 here",
        })?;
        let header = cpio::NewcBuilder::new(name).ino(ino).uid(0).gid(0).mtime(0);
        out = match &node.kind {
            Kind::Dir => finish(header.mode(libc_mode::DIR | node.mode).nlink(2), out, b"")?,
            Kind::Symlink(target) => {
                let target = target.as_os_str().as_encoded_bytes();
                finish(header.mode(libc_mode::LINK | node.mode), out, target)?
            }
            Kind::CharDevice { major, minor } => {
                let header = header.rdev_major(*major).rdev_minor(*minor);
                finish(header.mode(libc_mode::CHR | node.mode), out, b"")?
            }
            Kind::BlockDevice { major, minor } => {
                let header = header.rdev_major(*major).rdev_minor(*minor);
                finish(header.mode(libc_mode::BLK | node.mode), out, b"")?
            }
            Kind::File(content) => {
                let (mut reader, size) = content.open()?;
                let too_large = || InitramfsError::TooLarge {
                    path: path.to_path_buf(),
                    size,
                };
                let size32 = u32::try_from(size).map_err(|_| too_large())?;
                let mut writer = header.mode(libc_mode::REG | node.mode).write(out, size32);
                let copied = io::copy(&mut (&mut reader).take(size), &mut writer)?;
                if copied != size || reader.read(&mut [0u8; 1])? != 0 {
                    return Err(InitramfsError::Changed {
                        path: path.to_path_buf(),
                    });
                }
                writer.finish()?
            }
        };
    }
    Ok(cpio::newc::trailer(out)?)
}

fn finish<W: Write>(header: cpio::NewcBuilder, out: W, data: &[u8]) -> Result<W, InitramfsError> {
    let size = u32::try_from(data.len()).map_err(|_| io::Error::other("entry too large"))?;
    let mut writer = header.write(out, size);
    writer.write_all(data)?;
    Ok(writer.finish()?)
}

/// The `st_mode` file-type bits, which are the same on every Linux architecture.
mod libc_mode {
    pub const DIR: u32 = 0o040000;
    pub const REG: u32 = 0o100000;
    pub const LINK: u32 = 0o120000;
    pub const CHR: u32 = 0o020000;
    pub const BLK: u32 = 0o060000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_spec_needs_both_sides() {
        let spec: AddSpec = "/host/dir:/guest".parse().unwrap();
        assert_eq!(
            spec,
            AddSpec {
                src: "/host/dir".into(),
                dest: "/guest".into()
            }
        );
        for bad in ["nocolon", ":/guest", "/host:"] {
            let err = bad.parse::<AddSpec>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("SRC:DEST"), "{err}");
        }
    }

    #[test]
    fn entries_have_fixed_owner_time_and_counted_inodes() {
        let mut tree = Tree::new();
        tree.add_bytes("/a", 0o640, b"hello").unwrap();
        tree.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        let archive = write_cpio(&tree, Vec::new()).unwrap();
        let mut reader = cpio::NewcReader::new(archive.as_slice()).unwrap();
        let mut seen = Vec::new();
        loop {
            let e = reader.entry();
            if e.is_trailer() {
                break;
            }
            assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, 0), "{}", e.name());
            seen.push((
                e.name().to_string(),
                e.ino(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            ));
            reader = cpio::NewcReader::new(reader.finish().unwrap()).unwrap();
        }
        let expected = [
            ("a".to_string(), 1, 0o100640, 0, 0),
            ("dev".to_string(), 2, 0o040755, 0, 0),
            ("dev/console".to_string(), 3, 0o020600, 5, 1),
        ];
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_script_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "#!/bin/sh\n").unwrap();
        let err = tree(&agent, &[]).unwrap_err().to_string();
        assert!(err.contains("crt-static") && err.contains("agent"), "{err}");
    }
}
