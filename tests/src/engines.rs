//! A private containerd for full-path tests: its own root, state, sockets and config
//! (CRI off), the husk shim first on its PATH, the busybox image imported. Dropping it
//! stops containerd; [`Containerd::leftovers`] names anything a test left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The image `husk-rootfs image` writes by default (scripts/setup.sh).
pub const IMAGE: &str = "docker.io/library/husk-busybox:latest";

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guest template cache husk keeps under its `--root` (the shim's namespace directory).
const TEMPLATE_CACHE: &str = "@templates";

/// A running private containerd.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    /// Starts containerd; `isolation` is the shim's default (`HUSK_ISOLATION`; None: the
    /// shim's own default, a microVM).
    pub fn start(isolation: Option<&str>) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("husk-ctrd-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let shim = repo().join("target/debug/containerd-shim-husk-v2");
        assert!(
            shim.exists(),
            "{shim:?} missing: run cargo build --workspace"
        );
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-husk-v2")).unwrap();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/c.sock\"\n[ttrpc]\n  address = \"{0}/c.sock.ttrpc\"\n",
                d.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new("containerd");
        command
            .arg("-c")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("HUSK_SHIM_ROOT", d.join("husk"))
            .env_remove("HUSK_ISOLATION");
        if let Some(isolation) = isolation {
            command.env("HUSK_ISOLATION", isolation);
        }
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd not installed: run scripts/setup.sh");
        let c = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket().exists() || !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let tar = repo().join("target/husk/busybox-oci.tar");
        let out = c.ctr(&["image", "import", tar.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "import {tar:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd, killed after 120 s.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", "120", "ctr", "-a"])
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Pids of shim processes serving this containerd.
    pub fn shims(&self) -> Vec<i32> {
        let sock = self.socket().to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2") && cmd.contains(&sock))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Other processes working for this containerd's shims: husk's vmm daemons and exec
    /// relays, virtiofsd (their command lines name files under the private directory).
    pub fn helpers(&self) -> Vec<(i32, String)> {
        let d = self.dir.path().to_string_lossy().into_owned();
        let sock = self.socket().to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(pid, cmd)| {
                *pid != self.child.id() as i32 && cmd.contains(&d) && !cmd.contains(&sock)
            })
            .collect()
    }

    /// What is left: shim processes, mounts under the private dir, husk state entries.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .shims()
            .iter()
            .map(|p| format!("shim pid {p}"))
            .collect();
        left.extend(
            self.helpers()
                .into_iter()
                .map(|(pid, cmd)| format!("process {pid}: {cmd}")),
        );
        let d = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&d))
                .map(|l| format!("mount {l}")),
        );
        // A namespace's state directory must be gone, unless all it holds is husk's guest
        // template cache (`@templates`, kept across containers on purpose).
        if let Ok(nss) = std::fs::read_dir(self.dir.path().join("husk")) {
            for ns in nss.flatten() {
                let entries: Vec<_> = std::fs::read_dir(ns.path())
                    .map(|d| d.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                let cache_only = !entries.is_empty()
                    && entries
                        .iter()
                        .all(|e| e.file_name() == Some(TEMPLATE_CACHE.as_ref()));
                if !cache_only {
                    left.push(format!("state dir {:?}: {entries:?}", ns.path()));
                }
            }
        }
        left
    }

    /// Waits up to 10 s for everything to be gone, then asserts it is.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.leftovers(), Vec::<String>::new(), "left behind");
    }
}

/// (pid, command line) of every process but this one (zombies have an empty one).
pub(crate) fn processes() -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        all.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
    }
    all
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let helpers = self.helpers().into_iter().map(|(pid, _)| pid);
        for pid in self.shims().into_iter().chain(helpers) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let d = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&d))
        {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
