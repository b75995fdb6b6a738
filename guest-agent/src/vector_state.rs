//! AVX state on PVM hosts, and how the agent keeps glibc off it.
//!
//! On a PVM host the guest kernel boots with `noxsave` (its emulator cannot execute
//! xsave/xrstor or xgetbv), so a context switch saves only the FXSAVE state: x87 and the
//! low 128 bits of the vector registers. Guest user space runs natively and sees the host's
//! XCR0 with AVX and AVX-512 enabled, so glibc picks its AVX string and memory functions,
//! and a switch between two such processes on one vCPU corrupts the ymm/zmm upper halves.
//! Seen as new processes dying at start of a corrupted TLS block: glibc's AVX `memcpy` of
//! the TLS image was interrupted by a switch. The guest kernel cannot hide AVX here (KVM
//! accepts CR4.OSXSAVE and XCR0 = x87|SSE from the guest, yet PVM leaves the host's XCR0
//! loaded while guest user code runs, and the host has no CPUID faulting).
//!
//! So the VMM gives PVM guests `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...` (from
//! guest-kernel-config/cmdline.pvm: on the kernel command line, or for husk's own kernel
//! in a setup_data entry, runtime/src/vmm/boot/loader.rs); the kernel hands it to PID 1
//! (this agent) as an environment variable, glibc in the agent honours it, and the agent adds it
//! to every container process that does not set `GLIBC_TUNABLES` itself. Programs that use
//! AVX without glibc's dispatch (Go's runtime, JITs, hand-written SIMD) are not covered:
//! `husk features` says so.

/// The variable glibc reads its tunables from.
pub const TUNABLES_VAR: &str = "GLIBC_TUNABLES";

/// The tunables the agent was started with, to hand on to container processes; `None` when
/// the kernel passed none (hosts where the kernel saves the full vector state).
pub fn inherited_tunables() -> Option<String> {
    std::env::var(TUNABLES_VAR).ok().filter(|v| !v.is_empty())
}

/// Adds `GLIBC_TUNABLES=<inherited>` to a process environment that does not set the
/// variable itself (the spec's own value always wins).
pub fn add_tunables(env: &mut Vec<String>, inherited: Option<&str>) {
    let Some(value) = inherited else { return };
    let prefix = format!("{TUNABLES_VAR}=");
    if !env.iter().any(|e| e.starts_with(&prefix)) {
        env.push(format!("{prefix}{value}"));
    }
}

/// One console line: XCR0 as user space sees it and the tunables in force, read by the
/// full-path tests.
pub fn report(inherited: Option<&str>) -> String {
    const OSXSAVE: u32 = 1 << 27;
    const YMM: u64 = 1 << 2;
    let xcr0 = if std::arch::x86_64::__cpuid(1).ecx & OSXSAVE == 0 {
        "not enabled".to_string()
    } else {
        let (eax, edx): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0; it cannot fault once CPUID reports
        // OSXSAVE, and it touches no memory.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") edx,
                options(nomem, nostack, preserves_flags));
        }
        let xcr0 = (u64::from(edx) << 32) | u64::from(eax);
        let avx = if xcr0 & YMM != 0 { "on" } else { "off" };
        format!("{xcr0:#x} (AVX state {avx})")
    };
    match inherited {
        Some(t) => format!(
            "vector state: XCR0 {xcr0}; glibc in the agent and containers: {TUNABLES_VAR}={t}"
        ),
        None => format!("vector state: XCR0 {xcr0}; no {TUNABLES_VAR} from the kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunables_are_added_unless_the_process_sets_its_own() {
        let mut env = vec!["PATH=/bin".to_string()];
        add_tunables(&mut env, Some("glibc.cpu.hwcaps=-AVX"));
        assert_eq!(env, ["PATH=/bin", "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX"]);

        let mut own = vec!["GLIBC_TUNABLES=glibc.malloc.check=3".to_string()];
        add_tunables(&mut own, Some("glibc.cpu.hwcaps=-AVX"));
        assert_eq!(own, ["GLIBC_TUNABLES=glibc.malloc.check=3"]);

        let mut untouched = vec!["PATH=/bin".to_string()];
        add_tunables(&mut untouched, None);
        assert_eq!(untouched, ["PATH=/bin"]);
    }

    #[test]
    fn the_report_names_xcr0_and_the_tunables() {
        let line = report(Some("glibc.cpu.hwcaps=-AVX"));
        assert!(line.starts_with("vector state: XCR0 "), "{line}");
        assert!(
            line.ends_with("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX"),
            "{line}"
        );
        assert!(report(None).ends_with("no GLIBC_TUNABLES from the kernel"));
    }
}
