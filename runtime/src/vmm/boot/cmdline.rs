//! The guest kernel command line: the base every husk guest needs, the PVM compatibility
//! part on PVM hosts, the virtio-mmio devices, then what the caller adds.

use linux_loader::cmdline::Cmdline;

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

/// The command line for a guest on a host of `mode`, before devices and extras. A kernel
/// that reads the husk platform leaves (`kernel_reads_leaves`, [`super::kernel_notes`])
/// learns the PVM-hidden features from them, so `clearcpuid=` stays off its line.
pub fn base_cmdline(mode: HostMode, kernel_reads_leaves: bool) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(CmdlineError::Invalid)?;
    cmdline.insert_str(base()).map_err(CmdlineError::Invalid)?;
    if mode == HostMode::Pvm {
        let compat: Vec<&str> = pvm_compat()
            .split_whitespace()
            .filter(|arg| !(kernel_reads_leaves && arg.starts_with("clearcpuid=")))
            .collect();
        cmdline
            .insert_str(compat.join(" "))
            .map_err(CmdlineError::Invalid)?;
    }
    Ok(cmdline)
}

/// Appends free text (e.g. `--cmdline-extra`).
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

    #[test]
    fn pvm_hosts_get_the_compat_options_and_others_do_not() {
        let pvm = text(&base_cmdline(HostMode::Pvm, false).unwrap());
        assert_eq!(pvm, format!("{} {}", base(), pvm_compat()));
        assert!(pvm.contains("console=ttyS0") && pvm.contains("reboot=k"));
        assert!(pvm.contains("noxsave") && pvm.contains("clearcpuid=smap"));
        let hw = text(&base_cmdline(HostMode::Hardware, false).unwrap());
        assert_eq!(hw, base());
        assert_eq!(
            text(&base_cmdline(HostMode::Hardware, true).unwrap()),
            base()
        );
    }

    #[test]
    fn a_kernel_that_reads_the_leaves_gets_no_clearcpuid() {
        let pvm = text(&base_cmdline(HostMode::Pvm, true).unwrap());
        assert!(!pvm.contains("clearcpuid"), "{pvm}");
        assert!(
            pvm.contains("noxsave") && pvm.contains("GLIBC_TUNABLES="),
            "{pvm}"
        );
    }

    #[test]
    fn devices_and_extras_are_appended() {
        let mut c = base_cmdline(HostMode::Hardware, false).unwrap();
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
        let mut c = base_cmdline(HostMode::Pvm, false).unwrap();
        let err = append(&mut c, &"x".repeat(CMDLINE_MAX_SIZE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cmdline-extra"), "{err}");
    }
}
