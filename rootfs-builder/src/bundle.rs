//! A runnable OCI bundle: `config.json` with the runtime spec's defaults (as `runc spec`
//! writes them) and the busybox rootfs unpacked in `rootfs/`.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{RootBuilder, Spec};

use crate::busybox::{self, BusyboxError};
use crate::tree::{Kind, Tree, TreeError};

/// The rootfs directory name inside the bundle, as `runc spec` sets `root.path`.
pub const ROOTFS_DIR: &str = "rootfs";

/// Errors writing a bundle. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BundleError {
    /// `{0}` exists and is not empty: pass `--force` to replace its `config.json` and `rootfs/`
    NotEmpty(PathBuf),
    /// `{0}` exists and is not a directory: choose another `--out`
    NotADir(PathBuf),
    /// {0}
    Busybox(#[from] BusyboxError),
    /// {0}
    Tree(#[from] TreeError),
    /// building config.json failed: {0}
    Spec(#[from] oci_spec::OciSpecError),
    /// writing `{path}` failed: {source}
    Write { path: PathBuf, source: io::Error },
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a bundle at `out` whose process runs `args` (`["sh"]` when empty).
pub fn build(out: &Path, args: &[String], busybox: &Path, force: bool) -> Result<(), BundleError> {
    // Describe the rootfs first: a missing busybox must not leave an empty bundle behind.
    let tree = busybox::rootfs(busybox)?;
    prepare_out_dir(out, force)?;
    write_tree(&tree, &out.join(ROOTFS_DIR))?;
    let config = out.join("config.json");
    let json = serde_json::to_vec_pretty(&spec(args)?).map_err(io::Error::from);
    fs::write(&config, json.map_err(write_err(&config))?).map_err(write_err(&config))
}

/// The runtime spec defaults with this bundle's process, root and hostname.
pub fn spec(args: &[String]) -> Result<Spec, BundleError> {
    let args = if args.is_empty() {
        vec!["sh".to_string()]
    } else {
        args.to_vec()
    };
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false)).set_args(Some(args));
    let root = RootBuilder::default()
        .path(ROOTFS_DIR)
        .readonly(true)
        .build()?;
    spec.set_process(Some(process))
        .set_root(Some(root))
        .set_hostname(Some(busybox::HOSTNAME.to_string()));
    Ok(spec)
}

fn prepare_out_dir(out: &Path, force: bool) -> Result<(), BundleError> {
    match fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                if !force {
                    return Err(BundleError::NotEmpty(out.to_path_buf()));
                }
                // Only what this command writes is removed: a mistaken `--out` must not
                // cost the user anything else in that directory.
                let rootfs = out.join(ROOTFS_DIR);
                if rootfs.exists() {
                    fs::remove_dir_all(&rootfs).map_err(write_err(&rootfs))?;
                }
                let config = out.join("config.json");
                if config.exists() {
                    fs::remove_file(&config).map_err(write_err(&config))?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(out).map_err(write_err(out))
        }
        Err(_) if out.exists() => Err(BundleError::NotADir(out.to_path_buf())),
        Err(e) => Err(write_err(out)(e)),
    }
}

/// Creates every node of `tree` below `root` with the tree's permission bits.
pub fn write_tree(tree: &Tree, root: &Path) -> Result<(), BundleError> {
    fs::create_dir_all(root).map_err(write_err(root))?;
    let mut dirs = Vec::new();
    for (rel, node) in tree.iter() {
        let path = root.join(rel);
        match &node.kind {
            Kind::Dir => {
                fs::create_dir(&path).map_err(write_err(&path))?;
                dirs.push((path, node.mode));
            }
            Kind::File(content) => {
                let (mut reader, _) = content.open()?;
                let mut file = fs::File::create(&path).map_err(write_err(&path))?;
                io::copy(&mut reader, &mut file).map_err(write_err(&path))?;
                set_mode(&path, node.mode)?;
            }
            Kind::Symlink(target) => symlink(target, &path).map_err(write_err(&path))?,
            Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                let kind = if matches!(node.kind, Kind::CharDevice { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                let dev = makedev(u64::from(*major), u64::from(*minor));
                let mode = Mode::from_bits_truncate(node.mode);
                mknod(&path, kind, mode, dev).map_err(|e| write_err(&path)(e.into()))?;
                set_mode(&path, node.mode)?;
            }
        }
    }
    // Directory modes last, so a read-only directory does not block its own contents;
    // also undoes the umask.
    for (path, mode) in dirs.iter().rev() {
        set_mode(path, *mode)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BundleError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(write_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_args_are_sh_and_given_args_replace_them() {
        let spec = spec(&[]).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(process.terminal(), Some(false));
        let spec = super::spec(&["echo".into(), "hi".into()]).unwrap();
        let args = spec.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args, ["echo", "hi"]);
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new(ROOTFS_DIR));
    }

    #[test]
    fn tree_is_written_with_modes_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.add_bytes("/etc/secret", 0o600, b"s").unwrap();
        tree.add_symlink("/bin/sh", "/bin/busybox").unwrap();
        tree.add_dir("/tmp", 0o1777).unwrap();
        let root = dir.path().join("root");
        write_tree(&tree, &root).unwrap();
        let mode = |p: &str| {
            fs::symlink_metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("etc/secret") & 0o7777, 0o600);
        assert_eq!(mode("tmp") & 0o7777, 0o1777);
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(fs::read(root.join("etc/secret")).unwrap(), b"s");
    }

    #[test]
    fn a_non_empty_dir_needs_force_and_keeps_other_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        fs::write(dir.path().join("config.json"), "old").unwrap();
        let err = prepare_out_dir(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        prepare_out_dir(dir.path(), true).unwrap();
        assert!(!dir.path().join("config.json").exists());
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn a_file_as_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        let err = prepare_out_dir(&file, true).unwrap_err();
        assert!(matches!(err, BundleError::NotADir(_)), "{err}");
    }
}
