//! The guest root as a read-only ext4 disk image, exposed by the VMM as virtio-blk
//! `/dev/vda` and mounted by the guest kernel (`root=/dev/vda ro rootfstype=ext4
//! init=/init`).
//!
//! Unlike the initramfs, which the emulated guest kernel copies byte by byte (~3.5 s per
//! MB), the guest reads only the pages it touches. The tree is the initramfs's
//! ([`crate::initramfs::tree`]): staged in a temporary directory with
//! [`crate::bundle::write_tree`], then turned into an image by `mke2fs -d`, and finally
//! every inode's times are zeroed with `debugfs`, so the same inputs give byte-identical
//! images. Needs e2fsprogs (`mke2fs`, `debugfs`) and root (see [`RootDiskError::NotRoot`]).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::bundle::{self, BundleError};
use crate::tree::Tree;

/// Errors building the root disk image. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RootDiskError {
    /// `root-disk` must run as root: it creates `/dev/console` with mknod, and `mke2fs -d` copies each staged file's owner into the image
    NotRoot,
    /// `{tool}` not found in PATH, /usr/sbin or /sbin: install e2fsprogs (`apt-get install e2fsprogs`)
    ToolMissing { tool: &'static str },
    /// staging the guest root for mke2fs failed: {0}
    Stage(#[from] BundleError),
    /// measuring the staged guest root in `{path}` failed: {source}
    Measure {
        path: PathBuf,
        source: walkdir::Error,
    },
    /// creating a temporary file in `{dir}` for `{out}` failed: {source}
    Temp {
        dir: PathBuf,
        out: PathBuf,
        source: io::Error,
    },
    /// running `{tool}` failed: {source}
    Spawn { tool: PathBuf, source: io::Error },
    /// `{tool}` failed ({status}): {stderr}
    Tool {
        tool: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    /// reading the superblock of `{path}` back failed: {source}
    ReadBack { path: PathBuf, source: io::Error },
    /// `{path}` written by mke2fs has no ext4 superblock
    NotExt4 { path: PathBuf },
    /// writing `{path}` failed: {source}
    Write { path: PathBuf, source: io::Error },
}

/// The filesystem block size (`-b`): the page size, so the guest's page cache maps blocks
/// one to one.
const BLOCK: u64 = 4096;

/// The on-disk inode size (`-I`), fixed so the image does not depend on the host's
/// mke2fs.conf; 256 bytes hold the extra timestamp fields.
const INODE_SIZE: u64 = 256;

/// Room for what mke2fs adds on its own: superblock, group descriptors, bitmaps, the
/// root directory and a 16 KiB lost+found.
const METADATA_SLACK: u64 = 1536 * 1024;

/// Inodes 1 to 11 are reserved (2 is the root, 11 lost+found); the rest is margin.
const SPARE_INODES: u64 = 32;

/// Fixed so the same inputs give the same image (and the guest could find it by UUID).
const UUID: &str = "4875736b-0000-4000-8000-000000000001";

/// The seed of the directory-index hashes; random per image unless fixed.
const HASH_SEED: &str = "4875736b-0000-4000-8000-000000000002";

const LABEL: &str = "husk-root";

/// Where Debian keeps mke2fs and debugfs when they are not on a non-root user's PATH.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// What the staged tree needs on disk, to size the image and its inode table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Blocks for file data, directory blocks, extent-tree blocks and symlink targets.
    pub blocks: u64,
    /// Inodes, one per staged node (the tree has no hard links).
    pub nodes: u64,
    /// Bytes of directory entries, all directories together.
    pub dirent_bytes: u64,
}

impl Usage {
    /// A regular file of `size` bytes named with `name_len` bytes.
    pub fn add_file(&mut self, size: u64, name_len: usize) {
        self.blocks += size.div_ceil(BLOCK);
        // Up to four extents fit in the inode; a larger file may need extent-tree blocks.
        // mke2fs writes files contiguously, but a hole (a run of zero blocks) starts a new
        // extent, so allow one tree block per MiB (a block holds 340 extents).
        if size > 4 * BLOCK {
            self.blocks += size.div_ceil(1 << 20);
        }
        self.add_node(name_len);
    }

    /// A directory: its first block (more come from `dirent_bytes`).
    pub fn add_dir(&mut self, name_len: usize) {
        self.blocks += 1;
        self.add_node(name_len);
    }

    /// A symlink: a block for targets too long for the inode (counted for every one).
    pub fn add_symlink(&mut self, name_len: usize) {
        self.blocks += 1;
        self.add_node(name_len);
    }

    /// A device node: an inode and nothing else.
    pub fn add_device(&mut self, name_len: usize) {
        self.add_node(name_len);
    }

    fn add_node(&mut self, name_len: usize) {
        self.nodes += 1;
        // ext4_dir_entry_2: 8 bytes of header, then the name, padded to 4 bytes.
        self.dirent_bytes += (8 + name_len as u64).next_multiple_of(4);
    }

    /// The inode count to ask mke2fs for (`-N`).
    pub fn inodes(&self) -> u64 {
        self.nodes + SPARE_INODES
    }

    /// The image size in KiB, a whole number of blocks.
    pub fn size_kib(&self) -> u64 {
        // Directory blocks twice over: leaf blocks are not full, and large directories
        // get hashed-index blocks.
        let dir_blocks = 2 * self.dirent_bytes.div_ceil(BLOCK);
        let blocks = self.blocks + dir_blocks;
        // Each 128 MiB block group adds bitmaps and a backup superblock: well under 1/256.
        let blocks = blocks + blocks.div_ceil(256);
        let bytes = blocks * BLOCK + self.inodes() * INODE_SIZE + METADATA_SLACK;
        bytes.next_multiple_of(BLOCK) / 1024
    }

    /// Measures a staged directory tree (without following symlinks).
    pub fn of_dir(root: &Path) -> Result<Usage, RootDiskError> {
        let mut usage = Usage::default();
        for entry in walkdir::WalkDir::new(root).follow_links(false).min_depth(1) {
            let entry = entry.map_err(|source| RootDiskError::Measure {
                path: root.to_path_buf(),
                source,
            })?;
            let name_len = entry.file_name().len();
            let file_type = entry.file_type();
            if file_type.is_dir() {
                usage.add_dir(name_len);
            } else if file_type.is_file() {
                let meta = entry.metadata().map_err(|source| RootDiskError::Measure {
                    path: root.to_path_buf(),
                    source,
                })?;
                usage.add_file(meta.len(), name_len);
            } else if file_type.is_symlink() {
                usage.add_symlink(name_len);
            } else {
                usage.add_device(name_len);
            }
        }
        Ok(usage)
    }
}

/// Writes `tree` at `out` as a read-only ext4 image. The image is built in a temporary
/// file next to `out` and renamed into place only when complete, so a failure leaves
/// nothing behind.
pub fn write_root_disk(tree: &Tree, out: &Path) -> Result<(), RootDiskError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RootDiskError::NotRoot);
    }
    let mke2fs = find_tool("mke2fs")?;
    let debugfs = find_tool("debugfs")?;

    let work = tempfile::Builder::new()
        .prefix("husk-root-disk-")
        .tempdir()
        .map_err(|source| RootDiskError::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    let stage = work.path().join("root");
    bundle::write_tree(tree, &stage)?;
    // mke2fs -d gives the image's root directory the staging directory's mode, which
    // create_dir_all left to the umask.
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o755)).map_err(|source| {
        RootDiskError::Write {
            path: stage.clone(),
            source,
        }
    })?;
    let usage = Usage::of_dir(&stage)?;

    let dir = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".husk-root-")
        .suffix(".img")
        .tempfile_in(dir)
        .map_err(|source| RootDiskError::Temp {
            dir: dir.to_path_buf(),
            out: out.to_path_buf(),
            source,
        })?;
    let image = temp.path();

    // Features off:
    // - has_journal: the image is mounted read-only, so there is nothing to replay, and
    //   setting up a journal at mount costs emulated guest-kernel time;
    // - metadata_csum: the guest kernel would checksum every metadata block it reads, in
    //   emulated code;
    // - resize_inode, orphan_file: the image is never resized and never written to.
    let mut mkfs = Command::new(&mke2fs);
    mkfs.args(["-q", "-F", "-t", "ext4"])
        .args([
            "-O",
            "^has_journal,^metadata_csum,^resize_inode,^orphan_file",
        ])
        .args(["-b", &BLOCK.to_string(), "-I", &INODE_SIZE.to_string()])
        .args(["-m", "0", "-N", &usage.inodes().to_string()])
        .args(["-L", LABEL, "-U", UUID])
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={HASH_SEED}"))
        .arg("-d")
        .arg(&stage)
        .arg(image)
        .arg(format!("{}k", usage.size_kib()));
    run_tool("mke2fs", &mke2fs, &mut mkfs)?;

    // Reproducibility: E2FSPROGS_FAKE_TIME (set in run_tool) does fix the superblock's
    // times and the crtime mke2fs gives each inode, but `-d` copies atime and ctime from
    // the staging directory, which were set just now and cannot be set back (ctime) or
    // change when mke2fs reads the files (atime). So every inode's four times are zeroed
    // here, as the initramfs has mtime 0. The two together make the image byte-identical
    // for the same inputs (tests/root_disk.rs checks it).
    let commands = work.path().join("debugfs-commands");
    fs::write(&commands, zero_times_script(used_inodes(image)?)).map_err(|source| {
        RootDiskError::Write {
            path: commands.clone(),
            source,
        }
    })?;
    let mut zero = Command::new(&debugfs);
    zero.arg("-w").arg("-f").arg(&commands).arg(image);
    run_tool("debugfs", &debugfs, &mut zero)?;

    let write_err = |source| RootDiskError::Write {
        path: out.to_path_buf(),
        source,
    };
    temp.as_file().sync_all().map_err(write_err)?;
    // Temporary files are created 0600; the image is meant to be read by others.
    fs::set_permissions(image, fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    temp.persist(out).map_err(|e| write_err(e.error))?;
    Ok(())
}

/// debugfs commands that zero the four times of the root, lost+found and every inode
/// mke2fs allocated for the tree (11 is lost+found; `-d` allocates from 12 upward, in
/// order, and the tree has no hard links).
fn zero_times_script(used_inodes: u32) -> String {
    let mut script = String::new();
    for ino in std::iter::once(2).chain(11..=used_inodes) {
        for field in ["atime", "ctime", "mtime", "crtime"] {
            script.push_str(&format!("set_inode_field <{ino}> {field} 0\n"));
        }
    }
    script
}

/// The number of inodes in use (`s_inodes_count - s_free_inodes_count`), read from the
/// primary superblock.
fn used_inodes(image: &Path) -> Result<u32, RootDiskError> {
    let read_err = |source| RootDiskError::ReadBack {
        path: image.to_path_buf(),
        source,
    };
    let mut superblock = [0u8; 1024];
    let mut file = File::open(image).map_err(read_err)?;
    file.seek(SeekFrom::Start(1024)).map_err(read_err)?;
    file.read_exact(&mut superblock).map_err(read_err)?;
    let le32 = |at: usize| u32::from_le_bytes(superblock[at..at + 4].try_into().unwrap());
    let magic = u16::from_le_bytes([superblock[0x38], superblock[0x39]]);
    let (count, free) = (le32(0x00), le32(0x10));
    if magic != 0xEF53 || free > count {
        return Err(RootDiskError::NotExt4 {
            path: image.to_path_buf(),
        });
    }
    Ok(count - free)
}

/// Runs an e2fsprogs tool, turning a failure into its stderr. debugfs exits 0 even when
/// a command fails, so anything on its stderr besides its version banner is a failure.
fn run_tool(name: &'static str, path: &Path, command: &mut Command) -> Result<(), RootDiskError> {
    let output = command
        // Fixed superblock times; see the reproducibility comment in write_root_disk.
        .env("E2FSPROGS_FAKE_TIME", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RootDiskError::Spawn {
            tool: path.to_path_buf(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with(&format!("{name} 1.")))
        .collect();
    if !output.status.success() || (name == "debugfs" && !complaints.is_empty()) {
        return Err(RootDiskError::Tool {
            tool: name,
            status: output.status,
            stderr: complaints.join("\n"),
        });
    }
    Ok(())
}

/// Finds an e2fsprogs tool on PATH, then in the sbin directories.
fn find_tool(name: &'static str) -> Result<PathBuf, RootDiskError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(SBIN_DIRS.iter().map(PathBuf::from));
    find_in(name, dirs)
}

fn find_in(
    name: &'static str,
    dirs: impl IntoIterator<Item = PathBuf>,
) -> Result<PathBuf, RootDiskError> {
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
        })
        .ok_or(RootDiskError::ToolMissing { tool: name })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn size_covers_rounded_files_and_metadata() {
        let empty = Usage::default();
        assert_eq!(empty.inodes(), SPARE_INODES);
        let base = empty.size_kib();
        assert!(base * 1024 >= METADATA_SLACK, "{base} KiB");

        // A 5 MB agent: every byte, rounded up to blocks, on top of the slack.
        let mut agent = Usage::default();
        agent.add_file(5_000_001, 4);
        let blocks = 5_000_001u64.div_ceil(BLOCK);
        assert!(agent.size_kib() * 1024 >= blocks * BLOCK + METADATA_SLACK);
        assert!(agent.size_kib() * 1024 < 5_000_001 + 2 * METADATA_SLACK);

        // Each small file costs a whole block, however small.
        let mut small = Usage::default();
        for _ in 0..1000 {
            small.add_file(1, 8);
        }
        assert!(small.size_kib() * 1024 >= 1000 * BLOCK + METADATA_SLACK);
        assert_eq!(small.inodes(), 1000 + SPARE_INODES);

        // Empty files, devices and directories still count inodes and entries.
        let mut nodes = Usage::default();
        nodes.add_file(0, 4);
        nodes.add_device(7);
        nodes.add_dir(3);
        nodes.add_symlink(2);
        assert_eq!(nodes.nodes, 4);
        assert_eq!(nodes.blocks, 2);
        assert_eq!(nodes.dirent_bytes, 12 + 16 + 12 + 12);
        assert!(nodes.size_kib() > base);

        // Whole blocks, and growing with the data.
        for usage in [empty, agent, small, nodes] {
            assert_eq!(usage.size_kib() % (BLOCK / 1024), 0, "{usage:?}");
        }
        let mut big = Usage::default();
        big.add_file(512 * MIB, 3);
        assert!(big.size_kib() * 1024 >= 512 * MIB + 512 + METADATA_SLACK);
    }

    #[test]
    fn measuring_a_directory_counts_every_node() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/file"), vec![1u8; 5000]).unwrap();
        std::os::unix::fs::symlink("sub/file", dir.path().join("link")).unwrap();
        let usage = Usage::of_dir(dir.path()).unwrap();
        assert_eq!(usage.nodes, 3);
        // sub: 1, file: 2 blocks, link: 1.
        assert_eq!(usage.blocks, 4);
    }

    #[test]
    fn a_missing_tool_names_the_package() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_in("mke2fs", [empty.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mke2fs") && err.contains("apt-get install e2fsprogs"),
            "{err}"
        );
    }

    #[test]
    fn zeroing_covers_root_lost_found_and_the_tree() {
        let script = zero_times_script(13);
        let inodes: Vec<&str> = script
            .lines()
            .filter(|line| line.ends_with("atime 0"))
            .map(|line| line.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(inodes, ["<2>", "<11>", "<12>", "<13>"]);
        assert_eq!(script.lines().count(), 16);
    }
}
