//! The jail logic against a recording fake kernel: paths, values, order of steps, and
//! cleanup when a step fails. The real kernel is exercised by tests/tests/confinement_jail.rs.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::Pid;

use super::sys::{Rlimit, Sys};
use super::*;

/// Records every call as a line; fails the call whose line starts with `fail_on`.
#[derive(Default)]
struct Fake {
    log: RefCell<Vec<String>>,
    existing: RefCell<HashSet<String>>,
    fail_on: Option<&'static str>,
    threads: usize,
}

impl Fake {
    fn new() -> Self {
        Self {
            threads: 1,
            ..Default::default()
        }
    }
    fn call(&self, line: String) -> io::Result<()> {
        let fail = self.fail_on.is_some_and(|f| line.starts_with(f));
        self.log.borrow_mut().push(line);
        if fail {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
    fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }
    fn index(&self, prefix: &str) -> usize {
        self.log()
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:#?}", self.log()))
    }
}

impl Sys for Fake {
    fn thread_count(&self) -> io::Result<usize> {
        Ok(self.threads)
    }
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.call(format!("mkdir {} {mode:o}", path.display()))?;
        self.existing
            .borrow_mut()
            .insert(path.display().to_string());
        Ok(())
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.existing
            .borrow_mut()
            .remove(&path.display().to_string());
        self.call(format!("rmdir {}", path.display()))
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let prefix = path.display().to_string();
        self.existing
            .borrow_mut()
            .retain(|p| !p.starts_with(&prefix));
        self.call(format!("rm -r {}", path.display()))
    }
    fn exists(&self, path: &Path) -> bool {
        self.existing.borrow().contains(&path.display().to_string())
    }
    fn link_or_copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.call(format!("link {} {}", from.display(), to.display()))
    }
    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        self.call(format!("write {} {contents}", path.display()))
    }
    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()> {
        self.call(format!("mknod {} {major}:{minor} {mode:o}", path.display()))
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.call(format!("chown {} {uid}:{gid}", path.display()))
    }
    fn unshare(&self, flags: CloneFlags) -> io::Result<()> {
        self.call(format!("unshare {:#x}", flags.bits()))
    }
    fn fork(&self) -> io::Result<Option<Pid>> {
        // The child's side is the interesting one here.
        self.call("fork".into()).map(|()| None)
    }
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        _data: Option<&str>,
    ) -> io::Result<()> {
        self.call(format!(
            "mount {source:?} {} {fstype:?} {:#x}",
            target.display(),
            flags.bits()
        ))
    }
    fn chdir(&self, path: &Path) -> io::Result<()> {
        self.call(format!("chdir {}", path.display()))
    }
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        self.call(format!(
            "pivot_root {} {}",
            new_root.display(),
            put_old.display()
        ))
    }
    fn umount(&self, target: &Path, flags: MntFlags) -> io::Result<()> {
        self.call(format!("umount {} {:#x}", target.display(), flags.bits()))
    }
    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.call(format!("hostname {name}"))
    }
    fn getrlimit(&self, _: Rlimit) -> io::Result<(u64, u64)> {
        Ok((1024, 4096))
    }
    fn setrlimit(&self, which: Rlimit, soft: u64, hard: u64) -> io::Result<()> {
        self.call(format!("setrlimit {which:?} {soft} {hard}"))
    }
    fn close_fds_except(&self, keep: &[RawFd]) -> io::Result<()> {
        self.call(format!("close_fds_except {}", keep.len()))
    }
    fn last_cap(&self) -> io::Result<u32> {
        Ok(40)
    }
    fn drop_bounding_cap(&self, cap: u32) -> io::Result<()> {
        self.call(format!("capbset_drop {cap}"))
    }
    fn clear_ambient_caps(&self) -> io::Result<()> {
        self.call("ambient_clear".into())
    }
    fn set_ids(&self, uid: u32, gid: u32) -> io::Result<()> {
        self.call(format!("set_ids {uid} {gid}"))
    }
    fn clear_caps(&self) -> io::Result<()> {
        self.call("capset 0".into())
    }
    fn set_not_dumpable(&self) -> io::Result<()> {
        self.call("not_dumpable".into())
    }
    fn set_no_new_privs(&self) -> io::Result<()> {
        self.call("no_new_privs".into())
    }
}

fn config() -> JailConfig {
    let mut c = JailConfig::new(
        "vm1",
        Path::new("/run/husk"),
        Path::new("/boot/vmlinux"),
        Resources {
            vcpus: 2,
            guest_mem_mib: 128,
            cpu_quota_us: None,
            cpu_period_us: None,
        },
    );
    c.initrd = Some("/boot/initrd.cpio".into());
    c.cgroup_root = "/cg".into();
    c
}

#[test]
fn layout_and_boot_file_paths() {
    let l = JailLayout::new(Path::new("/run/husk"), "vm1").unwrap();
    assert_eq!(l.jail, Path::new("/run/husk/vm1/jail"));
    assert_eq!(l.run_dir(), Path::new("/run/husk/vm1/jail/run"));
    let (host, inside) = l.boot_file(Path::new("/a/b/vmlinux")).unwrap();
    assert_eq!(host, Path::new("/run/husk/vm1/jail/vmlinux"));
    assert_eq!(inside, Path::new("/vmlinux"));
    let e = JailLayout::new(Path::new("/run/husk"), "../etc").unwrap_err();
    assert!(matches!(e, JailError::Id(_)), "{e}");
    let e = JailLayout::new(Path::new("run/husk"), "vm1").unwrap_err();
    assert!(e.to_string().contains("fix --root"), "{e}");
    assert!(l.boot_file(Path::new("/")).is_err());
}

#[test]
fn per_vm_uids_are_stable_unprivileged_and_differ() {
    assert_eq!(uid_for("a"), uid_for("a"));
    assert_ne!(uid_for("a"), uid_for("b"));
    for id in ["a", "b", "some-long-container-id-0123456789"] {
        let uid = uid_for(id);
        assert!((layout::JAIL_ID_BASE..layout::JAIL_ID_BASE + layout::JAIL_ID_SPAN).contains(&uid));
    }
}

#[test]
fn cgroup_limits_add_the_vmm_overhead_to_the_spec() {
    let r = Resources {
        vcpus: 2,
        guest_mem_mib: 128,
        cpu_quota_us: None,
        cpu_period_us: None,
    };
    let l = CgroupLimits::for_vm(&r);
    assert_eq!(l.memory_bytes, (128 << 20) + cgroup::VMM_MEMORY_OVERHEAD);
    assert_eq!(l.cpu_period_us, 100_000);
    assert_eq!(l.cpu_quota_us, 2 * 100_000 + 10_000);
    assert_eq!(l.pids_max, 2 + cgroup::VMM_PIDS_OVERHEAD);
    let l = CgroupLimits::for_vm(&Resources {
        cpu_quota_us: Some(50_000),
        cpu_period_us: Some(200_000),
        ..r
    });
    assert_eq!(l.cpu_quota_us, 50_000 + 20_000);
    assert_eq!(
        l.files()[0].1,
        "cpu.cfs_period_us",
        "period first: quota is checked against it"
    );
    assert_eq!(
        cgroup::cgroup_dir(Path::new("/sys/fs/cgroup"), "memory", "vm1"),
        Path::new("/sys/fs/cgroup/memory/husk/vm1")
    );
}

#[test]
fn enter_builds_then_confines_in_a_safe_order() {
    let fake = Fake::new();
    let entered = enter_with(&fake, &config()).unwrap();
    let Entered::Jailed(jail) = entered else {
        panic!("the fake fork returns the child side");
    };
    assert_eq!(jail.kernel, Path::new("/vmlinux"));
    assert_eq!(jail.initrd.as_deref(), Some(Path::new("/initrd.cpio")));
    let log = fake.log();
    assert!(log.contains(&"link /boot/vmlinux /run/husk/vm1/jail/vmlinux".to_string()));
    assert!(log.contains(&"mknod /run/husk/vm1/jail/dev/kvm 10:232 660".to_string()));
    let uid = uid_for("vm1");
    assert!(log.contains(&format!("chown /run/husk/vm1/jail/dev/kvm {uid}:{uid}")));
    assert!(log.contains(&format!("chown /run/husk/vm1/jail/run {uid}:{uid}")));
    assert!(log.contains(&"write /cg/memory/husk/vm1/memory.limit_in_bytes 201326592".to_string()));
    assert!(log.contains(&"write /cg/pids/husk/vm1/cgroup.procs 0".to_string()));
    assert!(log.contains(&"setrlimit Core 0 0".to_string()));
    // 2048 wanted, 4096 allowed by the (fake) hard limit.
    assert!(log.contains(&"setrlimit NoFile 2048 2048".to_string()));
    assert!(log.contains(&"capbset_drop 40".to_string()));
    // The order that makes the jail hold.
    let order = [
        "unshare 0x20000000",
        "fork",
        "unshare 0x4c020000",
        "write /cg/cpu/husk/vm1/cgroup.procs",
        "mount None / None",
        "mknod",
        "pivot_root . .",
        "umount . ",
        "close_fds_except",
        "capbset_drop 0",
        "ambient_clear",
        "set_ids",
        "capset 0",
        "no_new_privs",
    ];
    let positions: Vec<usize> = order.iter().map(|p| fake.index(p)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{order:?} at {positions:?}"
    );
    assert!(!log
        .iter()
        .any(|l| l.starts_with("set_ids") && l.contains(" 0")));
}

#[test]
fn a_failing_host_step_removes_what_was_made() {
    let fake = Fake {
        fail_on: Some("write /cg/memory"),
        ..Fake::new()
    };
    let e = enter_with(&fake, &config()).unwrap_err();
    assert!(
        e.to_string().contains("set a cgroup limit")
            && e.to_string().contains("memory.limit_in_bytes"),
        "{e}"
    );
    let log = fake.log();
    assert!(
        log.contains(&"rmdir /cg/cpu/husk/vm1".to_string()),
        "{log:#?}"
    );
    assert!(log.contains(&"rm -r /run/husk/vm1".to_string()), "{log:#?}");
    assert!(!log.iter().any(|l| l.starts_with("unshare")));
    assert!(
        fake.existing.borrow().iter().all(|p| p.ends_with("/husk")),
        "{:?}",
        fake.existing
    );
}

#[test]
fn refuses_root_user_threads_and_an_existing_jail() {
    let mut c = config();
    c.uid = 0;
    assert!(matches!(
        enter_with(&Fake::new(), &c),
        Err(JailError::RootUser { .. })
    ));
    let fake = Fake {
        threads: 3,
        ..Fake::new()
    };
    let e = enter_with(&fake, &config()).unwrap_err();
    assert!(
        e.to_string()
            .contains("before the vmm starts threads (3 running)"),
        "{e}"
    );
    assert!(
        fake.log().is_empty(),
        "nothing may be made: {:?}",
        fake.log()
    );
    let fake = Fake::new();
    fake.existing.borrow_mut().insert("/run/husk/vm1".into());
    let e = enter_with(&fake, &config()).unwrap_err();
    assert!(matches!(e, JailError::Exists(_)), "{e}");
    assert!(fake.log().is_empty());
}

#[test]
fn a_thread_drops_all_its_capabilities_and_only_its_own() {
    fn caps() -> Vec<String> {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .map(str::to_string)
            .collect()
    }
    let before = caps();
    let dropped = std::thread::spawn(|| {
        super::drop_thread_capabilities().unwrap();
        caps()
    })
    .join()
    .unwrap();
    for line in &dropped {
        assert!(line.ends_with("0000000000000000"), "{dropped:?}");
    }
    // Capabilities are per thread: this one keeps what it had.
    assert_eq!(caps(), before);
}

#[test]
fn extra_files_are_linked_into_the_jail_root_and_named_as_the_vmm_sees_them() {
    let fake = Fake::new();
    let mut c = config();
    c.files = vec!["/run/husk/@templates/abc.snap".into()];
    let Entered::Jailed(jail) = enter_with(&fake, &c).unwrap() else {
        panic!("the fake fork returns the child side");
    };
    assert_eq!(jail.files, vec![Path::new("/abc.snap").to_path_buf()]);
    let log = fake.log();
    assert!(
        log.contains(&"link /run/husk/@templates/abc.snap /run/husk/vm1/jail/abc.snap".to_string()),
        "{log:#?}"
    );
}

#[test]
fn a_cgroup_an_earlier_sandbox_left_is_replaced_unless_it_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let cgroup = dir.path().join("vm1");
    let sys = super::sys::RealSys;
    create_vm_cgroup(&sys, &cgroup).unwrap();
    // Left behind (empty, as a cgroup with no process is): removed and made again.
    create_vm_cgroup(&sys, &cgroup).unwrap();
    assert!(cgroup.is_dir());
    // In use (the kernel refuses to remove a cgroup with processes; here: not empty).
    std::fs::write(cgroup.join("tasks"), "1").unwrap();
    let err = create_vm_cgroup(&sys, &cgroup).unwrap_err().to_string();
    assert!(err.contains("an earlier sandbox with this id"), "{err}");
}
