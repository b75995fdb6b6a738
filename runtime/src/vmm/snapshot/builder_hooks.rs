//! The builder's restore path (a child module of `builder`, so it sees the builder's
//! fields; it lives with the rest of the snapshot code).

use std::path::Path;

use kvm_ioctls::VcpuFd;

use super::{BuildError, VmBuilder};
use crate::vmm::boot::cpuid;
use crate::vmm::config::VmConfig;
use crate::vmm::memory::MemoryError;
use crate::vmm::snapshot::{fingerprint, Fingerprint, LoadedSnapshot, SnapshotError};

impl VmBuilder {
    /// Like [`VmBuilder::new`], with guest RAM mapped copy-on-write from the snapshot at
    /// `path` instead of a fresh memfd (or, for a VM with virtio-fs shares, copied into
    /// one). Add the same virtio devices in the same order as
    /// the VM that was snapshotted, then [`VmBuilder::start`] checks that the
    /// configuration matches the snapshot's fingerprint, restores the KVM and device state
    /// and resumes the vCPUs where they were. A damaged, outdated or foreign snapshot is
    /// an error for which [`crate::vmm::snapshot::SnapshotError::snapshot_unusable`] is
    /// true: boot cold instead.
    pub fn restore(config: VmConfig, path: &Path) -> Result<Self, BuildError> {
        let mem_size = config
            .mem_mib
            .checked_mul(1 << 20)
            .ok_or(MemoryError::TooLarge(config.mem_mib))?;
        // virtiofsd (vhost-user) maps guest RAM from its memfd and must see the guest's
        // writes, which a private file mapping keeps to itself.
        let shared = !config.devices.shares.is_empty();
        let (loaded, mem) = LoadedSnapshot::load(path, config.vcpus, mem_size, shared)?;
        Self::with_memory(config, Some((mem, Box::new(loaded))))
    }

    /// The identity of this VM's configuration: what a snapshot of it is tagged with, and
    /// a good key for a template cache.
    pub fn fingerprint(&self) -> Result<Fingerprint, BuildError> {
        let args = self.kernel_args()?;
        let line = args
            .cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mem_mib = self.mem_size() >> 20;
        let boot_and_cpu = format!(
            "{line}\0{}\0cpu template {:?}",
            args.init_env.join("\0"),
            self.cpu_template
        );
        Ok(fingerprint(self.vcpus, mem_mib, &self.boot, &boot_and_cpu)?)
    }

    fn mem_size(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Checks the fingerprint, restores VM and device state, and creates the vCPUs with
    /// their saved state.
    pub(super) fn restore_vcpus(
        &self,
        snapshot: &LoadedSnapshot,
        expected: Fingerprint,
    ) -> Result<Vec<VcpuFd>, BuildError> {
        snapshot.check_fingerprint(expected)?;
        snapshot.restore_vm(&self.vm, self.mmio_slots.len())?;
        let supported = cpuid::supported_cpuid(&self.kvm)?;
        let cpuids = (0..self.vcpus)
            .map(|index| {
                cpuid::vcpu_cpuid(
                    &supported,
                    index,
                    self.vcpus,
                    self.cpu_template,
                    self.host_mode,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fds = snapshot.create_vcpus(&self.vm, &cpuids)?;
        {
            let mut serial = self.legacy.serial.lock().expect("serial lock poisoned");
            snapshot.restore_devices(&mut serial, self.devices.transports())?;
        }
        // Streams open at the snapshot lost their host ends: the guest must drop them
        // (virtio 1.2, 5.10.6.6). With none open (a template at agent ready) the reset is
        // skipped, because the guest handles it in a worker that may run after the host's
        // first new connection and would drop that one too.
        if let Some(vsock) = self.devices.vsock() {
            let mut vsock = vsock.lock().expect("vsock lock poisoned");
            if vsock.is_active() && snapshot.state.devices.vsock_connections > 0 {
                let sent = vsock
                    .send_transport_reset()
                    .map_err(|e| SnapshotError::Device {
                        device: "vsock",
                        reason: e.to_string(),
                    })?;
                log::info!("vsock transport reset after restore (event delivered: {sent})");
            }
        }
        if snapshot.state.devices.ready && self.legacy.ready_time.set(self.start.elapsed()).is_ok()
        {
            self.legacy
                .ready_evt
                .write(1)
                .map_err(BuildError::EventFd)?;
        }
        Ok(fds)
    }
}
