//! The guest kernel command line: the base every husk guest needs, the PVM compatibility
//! part on PVM hosts, the virtio-mmio devices, then what the caller adds.

use linux_loader::cmdline::Cmdline;

use super::kernel_notes::KernelSupport;
use crate::host::HostMode;
use crate::vmm::memory::CMDLINE_MAX_SIZE;

/// Errors building the command line.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CmdlineError {
    /// the kernel command line does not fit in 2048 bytes or has invalid characters ({0}); shorten --cmdline-extra
    Invalid(linux_loader::cmdline::Error),
}

/// Validated under QEMU by the guest kernel work (guest-kernel-config/cmdline.base):
/// serial console, reset through the i8042 (the VMM's power-off), no reboot loop on
/// panic, and three boot-time cuts (guest-kernel-config/README.md, "Cut list"):
/// `rodata=off` (marking rodata read-only costs ~14 s of emulation on PVM),
/// `noreplace-smp` (a 1-vCPU guest does not rewrite its ~3000 `lock` prefixes one
/// `text_poke` each: ~2.4 M emulated instructions) and `percpu_alloc=page` (a first
/// per-CPU chunk of its own size instead of a 2 MiB one, whose allocation maps the
/// allocator scanned and zeroed: ~1.9 M).
pub fn base() -> &'static str {
    include_str!("../../../../guest-kernel-config/cmdline.base").trim()
}

/// Needed on PVM hosts only (guest-kernel-config/cmdline.pvm, shared/substrate.md): the
/// emulator lacks xsave/xrstor and the host's feature bits leak through CPUID, so the
/// kernel must not use them.
pub fn pvm_compat() -> &'static str {
    include_str!("../../../../guest-kernel-config/cmdline.pvm").trim()
}

/// What a guest kernel boots with: its command line, and init's environment when the
/// kernel takes that outside the command line.
#[derive(Debug)]
pub struct KernelArgs {
    pub cmdline: Cmdline,
    /// `NAME=value` strings for init, passed in husk's setup_data entry
    /// ([`super::loader`]); empty when they are on the command line.
    pub init_env: Vec<String>,
}

/// Whether a command-line argument is for init's environment rather than the kernel:
/// `NAME=value` with an upper-case NAME (kernel parameters are lower case).
fn is_init_env(arg: &str) -> bool {
    arg.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// The kernel arguments for a guest on a host of `mode`, before devices and extras. A
/// kernel that reads the husk platform leaves ([`super::kernel_notes`]) learns the
/// PVM-hidden features from them, so `clearcpuid=` and `noxsave` stay off its line; one
/// that reads init's environment from husk's setup_data entry gets `GLIBC_TUNABLES=`
/// there.
pub fn base_args(mode: HostMode, kernel: KernelSupport) -> Result<KernelArgs, CmdlineError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(CmdlineError::Invalid)?;
    cmdline.insert_str(base()).map_err(CmdlineError::Invalid)?;
    let mut args = KernelArgs {
        cmdline,
        init_env: Vec::new(),
    };
    if mode == HostMode::Pvm {
        // The leaves list these features (platform::PVM_HIDDEN_FEATURES, PVM_NOXSAVE).
        let compat: Vec<&str> = pvm_compat()
            .split_whitespace()
            .filter(|arg| {
                !(kernel.platform_leaves && (arg.starts_with("clearcpuid=") || *arg == "noxsave"))
            })
            .collect();
        append_extra(&mut args, &compat.join(" "), kernel)?;
    }
    Ok(args)
}

/// Appends the caller's arguments (`--cmdline-extra`); for a kernel that reads init's
/// environment from husk's setup_data entry, `NAME=value` arguments with an upper-case
/// NAME go there instead of the command line.
pub fn append_extra(
    args: &mut KernelArgs,
    extra: &str,
    kernel: KernelSupport,
) -> Result<(), CmdlineError> {
    let mut rest = Vec::new();
    for arg in extra.split_whitespace() {
        if kernel.init_env_setup_data && is_init_env(arg) {
            args.init_env.push(arg.to_string());
        } else {
            rest.push(arg);
        }
    }
    append(&mut args.cmdline, &rest.join(" "))
}

/// Appends free text (e.g. the root disk's arguments).
pub fn append(cmdline: &mut Cmdline, extra: &str) -> Result<(), CmdlineError> {
    if extra.trim().is_empty() {
        return Ok(());
    }
    cmdline
        .insert_str(extra.trim())
        .map_err(CmdlineError::Invalid)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    const PLAIN: KernelSupport = KernelSupport {
        platform_leaves: false,
        init_env_setup_data: false,
    };
    const LEAVES: KernelSupport = KernelSupport {
        platform_leaves: true,
        init_env_setup_data: false,
    };
    const LEAVES_AND_ENV: KernelSupport = KernelSupport {
        platform_leaves: true,
        init_env_setup_data: true,
    };

    fn base_cmdline(mode: HostMode, kernel: KernelSupport) -> Result<Cmdline, CmdlineError> {
        base_args(mode, kernel).map(|a| a.cmdline)
    }

    #[test]
    fn pvm_hosts_get_the_compat_options_and_others_do_not() {
        let pvm = text(&base_cmdline(HostMode::Pvm, PLAIN).unwrap());
        assert_eq!(pvm, format!("{} {}", base(), pvm_compat()));
        assert!(pvm.contains("console=ttyS0") && pvm.contains("reboot=k"));
        assert!(pvm.contains("noxsave") && pvm.contains("clearcpuid=smap"));
        let hw = text(&base_cmdline(HostMode::Hardware, PLAIN).unwrap());
        assert_eq!(hw, base());
        assert_eq!(
            text(&base_cmdline(HostMode::Hardware, LEAVES_AND_ENV).unwrap()),
            base()
        );
    }

    #[test]
    fn a_kernel_that_reads_the_leaves_gets_no_clearcpuid_nor_noxsave() {
        let pvm = text(&base_cmdline(HostMode::Pvm, LEAVES).unwrap());
        assert!(
            !pvm.contains("clearcpuid") && !pvm.contains("noxsave"),
            "{pvm}"
        );
        assert!(pvm.contains("GLIBC_TUNABLES="), "{pvm}");
    }

    #[test]
    fn a_kernel_that_reads_init_env_gets_glibc_tunables_outside_the_line() {
        let args = base_args(HostMode::Pvm, LEAVES_AND_ENV).unwrap();
        let line = text(&args.cmdline);
        assert_eq!(line, base(), "everything PVM needs went elsewhere");
        assert_eq!(args.init_env.len(), 1);
        assert!(args.init_env[0].starts_with("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"));
        assert!(args.init_env.join("\0").len() <= super::super::loader::INIT_ENV_MAX);
        // Kernel parameters stay on the line whatever the kernel reads.
        assert!(is_init_env("GLIBC_TUNABLES=x") && is_init_env("A_1=2"));
        for arg in ["noxsave", "clearcpuid=smap", "=x", "glibc.x=1", "Mixed=1"] {
            assert!(!is_init_env(arg), "{arg}");
        }
        let other = base_args(HostMode::Hardware, LEAVES_AND_ENV).unwrap();
        assert!(other.init_env.is_empty());
    }

    #[test]
    fn extra_init_variables_leave_the_line_only_for_a_kernel_that_reads_them() {
        let mut args = base_args(HostMode::Hardware, LEAVES_AND_ENV).unwrap();
        append_extra(&mut args, "HUSK_X=1 quiet  loglevel=6", LEAVES_AND_ENV).unwrap();
        assert_eq!(text(&args.cmdline), format!("{} quiet loglevel=6", base()));
        assert_eq!(args.init_env, ["HUSK_X=1"]);
        let mut args = base_args(HostMode::Hardware, LEAVES).unwrap();
        append_extra(&mut args, "HUSK_X=1 quiet", LEAVES).unwrap();
        assert_eq!(text(&args.cmdline), format!("{} HUSK_X=1 quiet", base()));
        assert!(args.init_env.is_empty());
    }

    #[test]
    fn devices_and_extras_are_appended() {
        let mut c = base_cmdline(HostMode::Hardware, PLAIN).unwrap();
        c.add_virtio_mmio_device(0x1000, GuestAddress(0xd000_0000), 5, None)
            .unwrap();
        append(&mut c, "  quiet ").unwrap();
        append(&mut c, "").unwrap();
        assert_eq!(
            text(&c),
            format!("{} virtio_mmio.device=4K@0xd0000000:5 quiet", base())
        );
    }

    #[test]
    fn overlong_extra_is_a_clear_error() {
        let mut c = base_cmdline(HostMode::Pvm, PLAIN).unwrap();
        let err = append(&mut c, &"x".repeat(CMDLINE_MAX_SIZE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cmdline-extra"), "{err}");
    }
}
