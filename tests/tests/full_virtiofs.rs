//! Full path (issue 5): container rootfs on virtio-fs in a real guest. One booted guest
//! serves every check (boots cost ~40 s here); each check is a named step. The last step
//! kills virtiofsd, which must stop the VM with a clear error and leave nothing behind.
//! Run with `flock /tmp/husk-vm.lock`.

mod full_guest_common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use full_guest_common::{boot, sha256_file, Guest};
use husk::vmm::guest::GuestVmError;
use husk_protocol::ExitStatus;

const BIG_MIB: usize = 64;
/// Longest silence of the container while it moves 64 MiB through the emulated kernel.
const BIG_STEP_TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn container_rootfs_on_virtio_fs_in_a_real_guest() {
    let guest = boot();
    read_write_list_copy_and_throughput(&guest);
    readonly_rootfs_refuses_writes(&guest);
    virtiofsd_death_stops_the_vm_cleanly(guest);
}

/// One container does the read/write checks, so the guest pays for one container start.
fn read_write_list_copy_and_throughput(guest: &Guest) {
    let id = "rw";
    let rootfs = guest.add_rootfs(id);
    std::fs::write(rootfs.join("host.txt"), "written on the host\n").unwrap();
    write_random_file(&rootfs.join("big"), BIG_MIB);
    let big_sha = sha256_file(&rootfs.join("big"));
    // The 64 MiB copy takes minutes here (every page the guest kernel copies is emulated
    // on PVM hosts), so the test does it once; throughput figures are bench/virtiofs.sh's.
    let script = "set -e
        echo \"host_file=$(cat /host.txt)\"
        echo from-the-guest > /fromguest.txt
        mkdir /many
        i=0; while [ $i -lt 100 ]; do echo $i > /many/f$i; i=$((i+1)); done
        echo \"listed=$(ls /many | wc -l)\"
        s=$(date +%s); dd if=/big of=/big.copy bs=1M; echo \"took_copy=$(( $(date +%s) - s ))s\"";
    let t0 = Instant::now();
    let (out, err, status) = guest.sh_with_timeout(id, script, false, BIG_STEP_TIMEOUT);
    eprintln!("{out}");
    eprintln!("rw container ran in {} ms", t0.elapsed().as_millis());
    assert_eq!(
        status,
        ExitStatus::Exited(0),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in stdout:\n{out}"))
            .to_string()
    };
    // A file written on the host is read in the container.
    assert_eq!(value("host_file"), "written on the host");
    // A file written in the container appears on the host.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("fromguest.txt")).unwrap(),
        "from-the-guest\n"
    );
    // 100 files created and listed, in the guest and on the host.
    assert_eq!(value("listed").trim(), "100");
    assert_eq!(std::fs::read_dir(rootfs.join("many")).unwrap().count(), 100);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("many/f42")).unwrap(),
        "42\n"
    );
    // A 64 MiB copy made inside the guest keeps its sha256, seen from both sides.
    assert_eq!(sha256_file(&rootfs.join("big.copy")), big_sha);
    let took = value("took_copy");
    eprintln!("figure: guest, busybox dd bs=1M copy of {BIG_MIB} MiB over virtio-fs: {took}");
}

fn readonly_rootfs_refuses_writes(guest: &Guest) {
    let (out, err, status) = guest.sh(
        "ro",
        "cat /etc/passwd >/dev/null && echo can-read; touch /nope",
        true,
    );
    assert_eq!(out, "can-read\n", "stderr: {err}");
    assert_ne!(
        status,
        ExitStatus::Exited(0),
        "touch on a read-only rootfs must fail"
    );
    assert!(err.contains("Read-only file system"), "stderr: {err}");
    assert!(!guest.vm.host_rootfs("ro").join("nope").exists());
}

fn virtiofsd_death_stops_the_vm_cleanly(mut guest: Guest) {
    let pid = child_named("virtiofsd").expect("virtiofsd runs as a child of the VMM");
    // SAFETY: kill(2) on a pid we just found among our own children.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let result = guest.vm.wait(Duration::from_secs(60));
    let err = match result {
        Err(e @ GuestVmError::Run(_)) => e.to_string(),
        other => panic!("virtiofsd's death must stop the VM with an error, got {other:?}"),
    };
    eprintln!(
        "VM stopped {} ms after virtiofsd was killed: {err}",
        t0.elapsed().as_millis()
    );
    assert!(err.contains("virtiofsd") && err.contains("died"), "{err}");
    assert!(
        err.contains("husk-share"),
        "the error names the share: {err}"
    );
    assert!(child_named("virtiofsd").is_none(), "virtiofsd reaped");
    for socket in ["vsock.sock", "virtiofsd.sock"] {
        assert!(
            !guest.dir.path().join(socket).exists(),
            "{socket} left behind"
        );
    }
    // The agent's socket is gone: a client gets an error, not a hang.
    assert!(guest.vm.agent().is_err());
}

fn write_random_file(path: &Path, mib: usize) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ mib as u64;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            // xorshift64: cheap, and incompressible enough to catch a wrong byte.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
}

fn child_named(name: &str) -> Option<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (comm, rest) = stat.split_once(") ")?;
            let comm = comm.split_once(" (")?.1;
            let ppid = rest.split_whitespace().nth(1)?;
            (comm == name && ppid == me)
                .then(|| entry.file_name().to_str()?.parse().ok())
                .flatten()
        })
}
