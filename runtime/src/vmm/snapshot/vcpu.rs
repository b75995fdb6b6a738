//! One vCPU's architectural state: saved on the vCPU's own thread while it is paused,
//! restored into a freshly created vCPU before its thread starts.
//!
//! Some state ioctls are optional: a host that refuses one (PVM refuses some, see
//! `shared/substrate.md`) still gets a snapshot, with the refusal recorded in
//! [`VcpuState::unavailable`] so a restore knows what it is missing. XSAVE state falls
//! back to the legacy FPU/SSE state (`KVM_GET_FPU`), which is all a guest booted with
//! `noxsave` uses.

use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::blob::Blob;
use super::SnapshotError;
use crate::vmm::boot::msrs::MSR_IA32_TSC;

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM keeps about one vCPU that a restore needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub mp_state: Blob,
    pub regs: Blob,
    pub sregs: Blob,
    /// Legacy FPU/SSE state; always saved (the fallback when XSAVE is unavailable).
    pub fpu: Blob,
    pub xsave: Option<Blob>,
    pub xcrs: Option<Blob>,
    pub debug_regs: Option<Blob>,
    pub lapic: Blob,
    pub vcpu_events: Blob,
    /// The TSC first, so TSC-relative MSRs (deadline) are restored after it.
    pub msrs: Vec<MsrValue>,
    pub tsc_khz: Option<u32>,
    /// Optional state this host refused to save, as "ioctl: error".
    pub unavailable: Vec<String>,
}

fn get<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SnapshotError> {
    r.map_err(|source| SnapshotError::Kvm { what, source })
}

fn optional<T>(
    what: &str,
    r: Result<T, kvm_ioctls::Error>,
    missing: &mut Vec<String>,
) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            missing.push(format!("{what}: {e}"));
            None
        }
    }
}

/// Asks KVM for the MSR index list on the calling thread if nobody has yet, so that vCPU
/// threads saving their state need not open /dev/kvm, which their seccomp filter forbids.
pub fn preload_msr_index_list() -> Result<(), SnapshotError> {
    msr_index_list().map(drop)
}

/// The MSR indices KVM can save and restore on this host (asked once per process).
fn msr_index_list() -> Result<&'static [u32], SnapshotError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let kvm = Kvm::new().map_err(|source| SnapshotError::Kvm {
        what: "opening /dev/kvm for the MSR index list",
        source,
    })?;
    let mut list = get("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?
        .as_slice()
        .to_vec();
    // The TSC first: KVM computes TSC-relative MSRs from the TSC being restored.
    list.sort_by_key(|&i| (i != MSR_IA32_TSC, i));
    Ok(LIST.get_or_init(|| list))
}

/// Reads every listed MSR KVM will give; an MSR it refuses is skipped and recorded.
fn save_msrs(fd: &VcpuFd, missing: &mut Vec<String>) -> Result<Vec<MsrValue>, SnapshotError> {
    let indices = msr_index_list()?;
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(SnapshotError::MsrList)?;
        // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read.
        let read = get("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        if read < rest.len() {
            missing.push(format!("MSR {:#x}: not readable", rest[read]));
            rest = &rest[read + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(saved)
}

impl VcpuState {
    /// Saves the state of a vCPU that is out of `KVM_RUN`. Call on the vCPU's thread.
    ///
    /// An exit for port or MMIO I/O is only complete once the vCPU re-enters `KVM_RUN`, so
    /// the vCPU is first run once with `immediate_exit` set: KVM finishes the pending
    /// instruction and returns at once without running guest code.
    pub fn save(index: u8, fd: &mut VcpuFd) -> Result<Self, SnapshotError> {
        fd.set_kvm_immediate_exit(1);
        let flushed = fd.run().map(|_| ());
        fd.set_kvm_immediate_exit(0);
        match flushed {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINTR => {}
            Err(source) => {
                return Err(SnapshotError::Kvm {
                    what: "KVM_RUN to complete pending I/O",
                    source,
                })
            }
        }
        let mut unavailable = Vec::new();
        let xsave = optional("KVM_GET_XSAVE", fd.get_xsave(), &mut unavailable);
        let xcrs = optional("KVM_GET_XCRS", fd.get_xcrs(), &mut unavailable);
        let debug_regs = optional("KVM_GET_DEBUGREGS", fd.get_debug_regs(), &mut unavailable);
        let tsc_khz = optional("KVM_GET_TSC_KHZ", fd.get_tsc_khz(), &mut unavailable);
        let msrs = save_msrs(fd, &mut unavailable)?;
        let state = Self {
            index,
            mp_state: Blob::of(&get("KVM_GET_MP_STATE", fd.get_mp_state())?),
            regs: Blob::of(&get("KVM_GET_REGS", fd.get_regs())?),
            sregs: Blob::of(&get("KVM_GET_SREGS", fd.get_sregs())?),
            fpu: Blob::of(&get("KVM_GET_FPU", fd.get_fpu())?),
            xsave: xsave.as_ref().map(Blob::of),
            xcrs: xcrs.as_ref().map(Blob::of),
            debug_regs: debug_regs.as_ref().map(Blob::of),
            lapic: Blob::of(&get("KVM_GET_LAPIC", fd.get_lapic())?),
            vcpu_events: Blob::of(&get("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?),
            msrs,
            tsc_khz,
            unavailable,
        };
        if !state.unavailable.is_empty() {
            log::info!(
                "vCPU {index}: state not saved (host refused): {}",
                state.unavailable.join("; ")
            );
        }
        Ok(state)
    }

    /// Restores the state into `fd`, a new vCPU whose CPUID is already set.
    ///
    /// Order matters: special registers (with the APIC base) before the LAPIC; the LAPIC
    /// before MSRs (the TSC deadline lives in the LAPIC timer); pending events last, so
    /// nothing set afterwards clears them.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let set = |what: &'static str, r: Result<(), kvm_ioctls::Error>| get(what, r);
        set(
            "KVM_SET_MP_STATE",
            fd.set_mp_state(self.mp_state.decode("mp_state")?),
        )?;
        set("KVM_SET_SREGS", fd.set_sregs(&self.sregs.decode("sregs")?))?;
        set("KVM_SET_REGS", fd.set_regs(&self.regs.decode("regs")?))?;
        match &self.xsave {
            Some(xsave) => {
                let area = xsave.decode("xsave")?;
                // SAFETY: the area was filled by KVM_GET_XSAVE (the legacy 4 KiB form), so
                // the features its header enables fit in the 4 KiB KVM reads back.
                set("KVM_SET_XSAVE", unsafe { fd.set_xsave(&area) })?
            }
            None => set("KVM_SET_FPU", fd.set_fpu(&self.fpu.decode("fpu")?))?,
        }
        if let Some(xcrs) = &self.xcrs {
            set("KVM_SET_XCRS", fd.set_xcrs(&xcrs.decode("xcrs")?))?;
        }
        if let Some(debug) = &self.debug_regs {
            set(
                "KVM_SET_DEBUGREGS",
                fd.set_debug_regs(&debug.decode("debug_regs")?),
            )?;
        }
        if let Some(khz) = self.tsc_khz {
            // Hosts with a different TSC rate may refuse; the guest then recalibrates
            // through kvmclock, so this is not fatal.
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {}: KVM_SET_TSC_KHZ {khz} failed: {e}", self.index);
            }
        }
        set("KVM_SET_LAPIC", fd.set_lapic(&self.lapic.decode("lapic")?))?;
        self.restore_msrs(fd)?;
        set(
            "KVM_SET_VCPU_EVENTS",
            fd.set_vcpu_events(&self.vcpu_events.decode("vcpu_events")?),
        )
    }

    fn restore_msrs(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(SnapshotError::MsrList)?;
        let written = get("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
        if written != entries.len() {
            return Err(SnapshotError::MsrRefused {
                index: entries[written].index,
                vcpu: self.index,
            });
        }
        Ok(())
    }
}
