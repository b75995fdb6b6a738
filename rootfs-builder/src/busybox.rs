//! The demo/test root filesystem: Debian's static busybox with its applet links and the
//! few files a shell and `id` expect. Bundles and images are both made from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::elf::{self, ElfError};
use crate::tree::{Tree, TreeError};

/// Where Debian's busybox-static installs the binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Where the binary sits inside the rootfs; applet links point here.
const BUSYBOX_IN_ROOTFS: &str = "/bin/busybox";

/// Errors building the busybox rootfs. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BusyboxError {
    /// busybox not found at `{path}`: install Debian's `busybox-static` package (`apt-get install busybox-static`) or pass `--busybox PATH`
    Missing { path: PathBuf },
    /// `{path}` cannot be used: {source}; install Debian's `busybox-static` package (not `busybox`)
    NotStatic { path: PathBuf, source: ElfError },
    /// running `{path} --list-full` failed: {reason}
    List { path: PathBuf, reason: String },
    /// {0}
    Tree(#[from] TreeError),
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";
pub const HOSTNAME: &str = "husk";

/// Describes the rootfs built around the busybox binary at `busybox`.
pub fn rootfs(busybox: &Path) -> Result<Tree, BusyboxError> {
    if !busybox.exists() {
        return Err(BusyboxError::Missing {
            path: busybox.to_path_buf(),
        });
    }
    elf::require_static(busybox).map_err(|source| BusyboxError::NotStatic {
        path: busybox.to_path_buf(),
        source,
    })?;
    let mut tree = Tree::new();
    tree.add_host_file(BUSYBOX_IN_ROOTFS, 0o755, busybox)?;
    for applet in applet_paths(busybox)? {
        if applet.trim_start_matches('/') != BUSYBOX_IN_ROOTFS.trim_start_matches('/') {
            tree.add_symlink(&applet, BUSYBOX_IN_ROOTFS)?;
        }
    }
    tree.add_bytes("/etc/passwd", 0o644, PASSWD.as_bytes())?;
    tree.add_bytes("/etc/group", 0o644, GROUP.as_bytes())?;
    tree.add_bytes("/etc/hostname", 0o644, format!("{HOSTNAME}\n").as_bytes())?;
    for dir in ["/proc", "/sys", "/dev"] {
        tree.add_dir(dir, 0o755)?;
    }
    tree.add_dir("/tmp", 0o1777)?;
    tree.add_dir("/root", 0o700)?;
    Ok(tree)
}

/// The applets' install paths, as the binary itself reports them (`usr/bin/awk`, ...).
fn applet_paths(busybox: &Path) -> Result<Vec<String>, BusyboxError> {
    let list_err = |reason: String| BusyboxError::List {
        path: busybox.to_path_buf(),
        reason,
    };
    let output = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| list_err(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(list_err(format!("{}: {}", output.status, stderr.trim())));
    }
    let stdout = String::from_utf8(output.stdout)
        .map_err(|_| list_err("the applet list is not UTF-8".to_string()))?;
    let paths: Vec<String> = stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if paths.is_empty() {
        return Err(list_err("it listed no applets".to_string()));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Kind;

    #[test]
    fn missing_busybox_names_the_package() {
        let err = rootfs(Path::new("/nonexistent/busybox"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("busybox-static") && err.contains("/nonexistent/busybox"),
            "{err}"
        );
    }

    #[test]
    fn dynamic_busybox_is_refused() {
        // Any dynamically linked binary stands in for Debian's non-static `busybox`.
        let err = rootfs(Path::new("/bin/ls")).unwrap_err().to_string();
        assert!(
            err.contains("busybox-static") && err.contains("dynamically linked"),
            "{err}"
        );
    }

    #[test]
    fn host_busybox_gives_sh_link_and_etc_files() {
        let tree = rootfs(Path::new(DEFAULT_BUSYBOX)).expect("needs Debian's busybox-static");
        let sh = tree.get("/bin/sh").expect("bin/sh applet link");
        assert_eq!(sh.kind, Kind::Symlink(BUSYBOX_IN_ROOTFS.into()));
        let bb = tree.get(BUSYBOX_IN_ROOTFS).unwrap();
        assert!(matches!(bb.kind, Kind::File(_)) && bb.mode == 0o755);
        for path in [
            "/etc/passwd",
            "/etc/group",
            "/etc/hostname",
            "/proc",
            "/sys",
            "/dev",
        ] {
            assert!(tree.get(path).is_some(), "{path} missing");
        }
        assert_eq!(tree.get("/tmp").unwrap().mode, 0o1777);
    }
}
