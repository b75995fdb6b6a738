//! Where the guest kernel, the guest image and virtiofsd are found.
//!
//! The guest image (`--initrd`) is the guest's root: the read-only ext4 root disk
//! `guest-root.img` (served as virtio-blk: the guest reads only what it touches) is
//! preferred to the initramfs `initramfs.cpio` (copied whole by the guest kernel) where
//! both were built.
//!
//! Order: an explicit path (flag), then `HUSK_KERNEL` / `HUSK_INITRD` / `HUSK_VIRTIOFSD`,
//! then what the project's build produced next to the binary (`target/husk/` for
//! `target/*/husk`), then the system install location `/usr/share/husk/` (guest files) or
//! `PATH` (virtiofsd, a host program).

use std::path::{Path, PathBuf};

/// A guest artifact the VMM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    Kernel,
    Initrd,
    /// The vhost-user virtio-fs backend (a host program).
    Virtiofsd,
}

impl Artifact {
    fn env_var(self) -> &'static str {
        match self {
            Artifact::Kernel => "HUSK_KERNEL",
            Artifact::Initrd => "HUSK_INITRD",
            Artifact::Virtiofsd => "HUSK_VIRTIOFSD",
        }
    }

    /// The names looked for in each place, best first.
    fn file_names(self) -> &'static [&'static str] {
        match self {
            Artifact::Kernel => &["vmlinux"],
            Artifact::Initrd => &[ROOT_DISK_FILE, "initramfs.cpio"],
            Artifact::Virtiofsd => &["virtiofsd"],
        }
    }

    fn what(self) -> &'static str {
        match self {
            Artifact::Kernel => "guest kernel",
            Artifact::Initrd => "guest image (root disk or initramfs)",
            Artifact::Virtiofsd => "virtiofsd",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Artifact::Kernel => "--kernel",
            Artifact::Initrd => "--initrd",
            Artifact::Virtiofsd => "--virtiofsd",
        }
    }
}

/// The root disk image `scripts/setup.sh` builds (`husk-rootfs root-disk`).
pub const ROOT_DISK_FILE: &str = "guest-root.img";

/// Errors locating guest artifacts.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ArtifactError {
    /// {what} not found (looked in: {looked}); build it with `scripts/setup.sh`, or pass its path with {flag} or {env}
    NotFound {
        what: &'static str,
        looked: String,
        flag: &'static str,
        env: &'static str,
    },
    /// {what} {path} does not exist; fix the path given with the flag or {env}
    Missing {
        what: &'static str,
        path: PathBuf,
        env: &'static str,
    },
}

/// The directory the project's build writes artifacts to, relative to a binary in
/// `target/<profile>/`.
pub fn build_output_dir(exe: &Path) -> Option<PathBuf> {
    Some(exe.parent()?.parent()?.join("husk"))
}

/// Finds `artifact`, honouring an explicit path first.
pub fn locate(artifact: Artifact, explicit: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let env = std::env::var_os(artifact.env_var()).map(PathBuf::from);
    let exe = std::env::current_exe().ok();
    let path = std::env::var_os("PATH");
    locate_in(
        artifact,
        explicit,
        env.as_deref(),
        exe.as_deref(),
        path.as_deref(),
    )
}

fn locate_in(
    artifact: Artifact,
    explicit: Option<&Path>,
    env: Option<&Path>,
    exe: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, ArtifactError> {
    if let Some(path) = explicit.or(env) {
        return if path.exists() {
            Ok(path.to_path_buf())
        } else {
            Err(ArtifactError::Missing {
                what: artifact.what(),
                path: path.to_path_buf(),
                env: artifact.env_var(),
            })
        };
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = exe.and_then(build_output_dir) {
        dirs.push(dir);
    }
    match artifact {
        // A host program: wherever the system installed it.
        Artifact::Virtiofsd => dirs.extend(
            path_var
                .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
        _ => dirs.push(PathBuf::from("/usr/share/husk")),
    }
    let candidates: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|dir| artifact.file_names().iter().map(|name| dir.join(name)))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        return Ok(found.clone());
    }
    Err(ArtifactError::NotFound {
        what: artifact.what(),
        looked: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        flag: artifact.flag(),
        env: artifact.env_var(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_wins_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let found = locate_in(
            Artifact::Kernel,
            Some(&k),
            Some(Path::new("/nope")),
            None,
            None,
        );
        assert_eq!(found.unwrap(), k);
        let err = locate_in(
            Artifact::Kernel,
            Some(Path::new("/nope/vmlinux")),
            None,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nope/vmlinux") && err.contains("HUSK_KERNEL"),
            "{err}"
        );
    }

    #[test]
    fn falls_back_to_build_output_next_to_binary() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("target/debug/husk");
        let out = dir.path().join("target/husk");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("initramfs.cpio"), b"x").unwrap();
        let found = locate_in(Artifact::Initrd, None, None, Some(&exe), None).unwrap();
        assert_eq!(found, out.join("initramfs.cpio"));
        // Where both were built, the root disk is the guest image.
        std::fs::write(out.join(ROOT_DISK_FILE), b"x").unwrap();
        let found = locate_in(Artifact::Initrd, None, None, Some(&exe), None).unwrap();
        assert_eq!(found, out.join(ROOT_DISK_FILE));
        let err = locate_in(Artifact::Kernel, None, None, Some(&exe), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }

    #[test]
    fn virtiofsd_env_then_build_output_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("target/debug/husk");
        let out = dir.path().join("target/husk");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let path_var = std::env::join_paths([Path::new("/nonexistent"), &bin]).unwrap();
        let v = Artifact::Virtiofsd;
        // Nowhere yet: the error names the env variable, the flag and setup.
        let err = locate_in(v, None, None, Some(&exe), Some(&path_var))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HUSK_VIRTIOFSD")
                && err.contains("--virtiofsd")
                && err.contains("scripts/setup.sh"),
            "{err}"
        );
        assert!(
            err.contains(&bin.join("virtiofsd").display().to_string()),
            "{err}"
        );
        // On PATH only.
        std::fs::write(bin.join("virtiofsd"), b"x").unwrap();
        let found = locate_in(v, None, None, Some(&exe), Some(&path_var)).unwrap();
        assert_eq!(found, bin.join("virtiofsd"));
        // The build output wins over PATH.
        std::fs::write(out.join("virtiofsd"), b"x").unwrap();
        let found = locate_in(v, None, None, Some(&exe), Some(&path_var)).unwrap();
        assert_eq!(found, out.join("virtiofsd"));
        // The env variable wins over both, and must exist.
        let found = locate_in(
            v,
            None,
            Some(&bin.join("virtiofsd")),
            Some(&exe),
            Some(&path_var),
        );
        assert_eq!(found.unwrap(), bin.join("virtiofsd"));
        let err = locate_in(
            v,
            None,
            Some(Path::new("/nope/vfsd")),
            Some(&exe),
            Some(&path_var),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nope/vfsd") && err.contains("HUSK_VIRTIOFSD"),
            "{err}"
        );
    }
}
