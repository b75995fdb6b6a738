//! Checks that a binary is a static ELF executable.
//!
//! The initramfs and the busybox rootfs carry no libc or dynamic loader, so a dynamically
//! linked `/init` or `/bin/busybox` fails only later, inside the guest, with a bare
//! "No such file or directory" or a crash. Checking here turns that into a clear message.

use std::path::{Path, PathBuf};

/// Errors checking a binary. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ElfError {
    /// cannot read `{path}`: {source}
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `{path}` is not an ELF executable: {source}
    NotElf {
        path: PathBuf,
        source: goblin::error::Error,
    },
    /// `{path}` is dynamically linked (interpreter `{interpreter}`); it needs a static build
    Interpreter { path: PathBuf, interpreter: String },
    /// `{path}` needs shared libraries ({libraries}); it needs a fully static build
    SharedLibraries { path: PathBuf, libraries: String },
}

/// Fails unless `path` is an ELF binary with no dynamic loader and no shared libraries.
pub fn require_static(path: &Path) -> Result<(), ElfError> {
    let bytes = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|source| ElfError::NotElf {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(interpreter) = elf.interpreter {
        return Err(ElfError::Interpreter {
            path: path.to_path_buf(),
            interpreter: interpreter.to_string(),
        });
    }
    // A "static-pie" that still lists DT_NEEDED libraries starts and then crashes
    // (shared/substrate.md: the libseccomp case), so libraries count as dynamic too.
    if !elf.libraries.is_empty() {
        return Err(ElfError::SharedLibraries {
            path: path.to_path_buf(),
            libraries: elf.libraries.join(", "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_refused_with_its_interpreter() {
        // /bin/sh is dash on Debian: dynamically linked against glibc.
        let err = require_static(Path::new("/bin/sh")).unwrap_err();
        assert!(matches!(err, ElfError::Interpreter { .. }), "{err}");
        assert!(err.to_string().contains("/bin/sh"), "{err}");
    }

    #[test]
    fn a_text_file_is_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let err = require_static(&script).unwrap_err();
        assert!(matches!(err, ElfError::NotElf { .. }), "{err}");
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = require_static(Path::new("/nonexistent/agent")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent"), "{err}");
    }
}
