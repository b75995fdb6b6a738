//! Which `husk` program runs the vmm daemon and the exec relays of `--isolation vm`.
//!
//! The VM backend is a library: the `husk` CLI uses it, and so does
//! `containerd-shim-husk-v2`, which is a different program. Re-executing the running
//! program is only right in the first case, so the backend looks for `husk` in order:
//! 1. `husk` next to the running program: the CLI itself, or the husk installed beside
//!    the shim (`target/debug/`, `/usr/local/bin/`), so the two always match;
//! 2. `HUSK_BINARY`, when set (an error if it names no program);
//! 3. `husk` on `PATH`.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The environment variable that names the husk program explicitly.
pub const HUSK_BINARY_ENV: &str = "HUSK_BINARY";

/// Errors finding the husk program.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum HuskBinaryError {
    /// HUSK_BINARY={0:?} is not an executable file; point it at the husk binary or unset it
    BadEnv(PathBuf),
    /// the husk binary was not found (looked in: {0}); install `husk` next to this program or on PATH, or set HUSK_BINARY to its path
    NotFound(String),
}

/// Finds the husk program for the running process (see the module docs for the order).
pub fn find() -> Result<PathBuf, HuskBinaryError> {
    let exe = std::env::current_exe().ok();
    let env = std::env::var_os(HUSK_BINARY_ENV);
    let path = std::env::var_os("PATH");
    find_in(exe.as_deref(), env.as_deref(), path.as_deref())
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_in(
    exe: Option<&Path>,
    env: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, HuskBinaryError> {
    let mut looked = Vec::new();
    if let Some(sibling) = exe.and_then(Path::parent).map(|dir| dir.join("husk")) {
        if is_executable(&sibling) {
            return Ok(sibling);
        }
        looked.push(sibling.display().to_string());
    }
    if let Some(explicit) = env.filter(|v| !v.is_empty()).map(PathBuf::from) {
        return if is_executable(&explicit) {
            Ok(explicit)
        } else {
            Err(HuskBinaryError::BadEnv(explicit))
        };
    }
    looked.push(format!("${HUSK_BINARY_ENV} (unset)"));
    for dir in path_var.map(std::env::split_paths).into_iter().flatten() {
        let candidate = dir.join("husk");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    looked.push("husk on $PATH".to_string());
    Err(HuskBinaryError::NotFound(looked.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn sibling_then_env_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shim = d.join("bin/containerd-shim-husk-v2");
        let env = d.join("env/husk");
        let on_path = d.join("path/husk");
        program(&shim);
        program(&env);
        program(&on_path);
        let path_var = std::env::join_paths([d.join("empty"), d.join("path")]).unwrap();
        // Nothing beside the shim: the environment wins over PATH.
        let found = find_in(Some(&shim), Some(env.as_os_str()), Some(&path_var));
        assert_eq!(found, Ok(env.clone()));
        assert_eq!(
            find_in(Some(&shim), None, Some(&path_var)),
            Ok(on_path.clone())
        );
        // husk beside the running program (or the running program itself) comes first.
        let sibling = d.join("bin/husk");
        program(&sibling);
        let found = find_in(Some(&shim), Some(env.as_os_str()), Some(&path_var));
        assert_eq!(found, Ok(sibling));
    }

    #[test]
    fn errors_name_what_was_searched_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shim = d.join("bin/containerd-shim-husk-v2");
        program(&shim);
        let err = find_in(Some(&shim), None, Some(d.as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&d.join("bin/husk").display().to_string()),
            "{err}"
        );
        assert!(
            err.contains("PATH") && err.contains("set HUSK_BINARY"),
            "{err}"
        );
        // A file that is not executable is not a program.
        let plain = d.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let err = find_in(Some(&shim), Some(plain.as_os_str()), None).unwrap_err();
        assert_eq!(err, HuskBinaryError::BadEnv(plain));
        assert!(err.to_string().contains("HUSK_BINARY="), "{err}");
    }
}
