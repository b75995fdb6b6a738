//! What kind of KVM this host offers, and what that means for the guest.

use std::path::Path;

/// The virtualization the host provides to husk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostMode {
    /// KVM backed by hardware virtualization (VT-x / AMD-V).
    Hardware,
    /// KVM provided by the `kvm_pvm` module: the guest kernel is emulated
    /// instruction by instruction and needs the compatibility command line.
    Pvm,
    /// No usable `/dev/kvm`: only `--isolation container` can run here.
    NoKvm,
}

impl HostMode {
    /// Detects the mode from `/dev/kvm` and `/sys/module/kvm_pvm`.
    /// Detected once per process and kept: a jailed vmm has no `/sys`, and its guest
    /// must get the same command line (and template key) as the launcher computed.
    pub fn detect() -> Self {
        static MODE: std::sync::OnceLock<HostMode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| {
            Self::detect_at(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
        })
    }

    fn detect_at(kvm_dev: &Path, pvm_module: &Path) -> Self {
        if !kvm_dev.exists() {
            HostMode::NoKvm
        } else if pvm_module.exists() {
            HostMode::Pvm
        } else {
            HostMode::Hardware
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostMode::Hardware => "hardware",
            HostMode::Pvm => "pvm",
            HostMode::NoKvm => "no-kvm",
        }
    }

    /// Known limits of this mode that users must be told about.
    pub fn caveats(self) -> &'static [&'static str] {
        match self {
            HostMode::Pvm => &[PVM_VECTOR_STATE_CAVEAT],
            HostMode::Hardware | HostMode::NoKvm => &[],
        }
    }
}

/// On PVM hosts the guest kernel runs with `noxsave` (its emulator has no xsave/xrstor),
/// so it saves only x87/SSE state on a context switch while guest user code (native)
/// still sees AVX enabled. husk turns glibc's AVX code off in the agent and in every
/// container process (`GLIBC_TUNABLES`, guest-agent/src/vector_state.rs); other AVX users
/// remain exposed.
pub const PVM_VECTOR_STATE_CAVEAT: &str = "PVM host: the guest kernel cannot save AVX/AVX-512 \
register state across context switches (noxsave); husk sets GLIBC_TUNABLES to keep glibc \
off AVX in every container process that does not set it itself, but other code that uses \
AVX in more than one process per vCPU (Go, JITs, hand-written SIMD) can compute wrong results";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_mode_from_paths() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        assert_eq!(HostMode::detect_at(&kvm, &pvm), HostMode::NoKvm);
        std::fs::write(&kvm, b"").unwrap();
        assert_eq!(HostMode::detect_at(&kvm, &pvm), HostMode::Hardware);
        std::fs::create_dir(&pvm).unwrap();
        assert_eq!(HostMode::detect_at(&kvm, &pvm), HostMode::Pvm);
        assert!(!HostMode::Pvm.caveats().is_empty());
    }
}
