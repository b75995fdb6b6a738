//! A private dockerd for full-path tests: Moby >= 23 (`target/husk/dockerd`, from Debian
//! trixie, scripts/setup.sh: bookworm's 20.10 cannot drive a shim v2), its own data root,
//! exec root and socket, bookworm's `docker` CLI. husk is configured three ways:
//! `husk` (the runc-compatible CLI through containerd's runc shim, container isolation),
//! `husk-vm` (the same in a microVM) and `husk-shim` (`runtimeType`: containerd-shim-husk-v2,
//! with the shim's isolation from `HUSK_ISOLATION=container`). Dropping it stops dockerd.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::engines::{processes, repo};

/// The image `husk-rootfs image` writes (loaded with `docker load`).
pub const IMAGE: &str = crate::engines::IMAGE;

/// A running private dockerd.
pub struct Docker {
    pub dir: tempfile::TempDir,
    child: Child,
    /// dockerd's own mounts under the directory, once it is up.
    own_mounts: Vec<String>,
}

/// Mount points under `dir`.
fn mounts_under(dir: &str) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(dir))
        .map(str::to_string)
        .collect()
}

impl Docker {
    pub fn start() -> Docker {
        let dockerd = repo().join("target/husk/dockerd");
        assert!(
            dockerd.exists(),
            "{dockerd:?} missing: run scripts/setup.sh (it fetches dockerd from Debian trixie)"
        );
        let husk = repo().join("target/debug/husk");
        let shim = repo().join("target/debug/containerd-shim-husk-v2");
        assert!(
            husk.exists() && shim.exists(),
            "run cargo build --workspace"
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-dockerd-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // dockerd's containerd looks shim v2 runtimes up on its PATH.
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-husk-v2")).unwrap();
        let config = serde_json::json!({
            "runtimes": {
                "husk": {"path": husk, "runtimeArgs": ["--isolation", "container"]},
                "husk-vm": {"path": husk, "runtimeArgs": ["--isolation", "vm"]},
                "husk-shim": {"runtimeType": "io.containerd.husk.v2"},
            }
        });
        std::fs::write(d.join("daemon.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(&dockerd)
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--iptables=false", "--bridge=none"])
            .env("PATH", path)
            .env("HUSK_SHIM_ROOT", d.join("husk-shim"))
            .env("HUSK_ISOLATION", "container")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let mut docker = Docker {
            dir,
            child,
            own_mounts: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker.docker(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up: {}",
                docker.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let tar = repo().join("target/husk/busybox-oci.tar");
        let out = docker.docker(&["load", "-i", tar.to_str().unwrap()]);
        assert!(out.status.success(), "docker load {tar:?}: {out:?}");
        docker.own_mounts = mounts_under(&docker.dir.path().to_string_lossy());
        docker
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Runs `docker` against this dockerd, killed after 600 s (a VM boots cold here).
    pub fn docker(&self, args: &[&str]) -> Output {
        let start = Instant::now();
        let out = Command::new("timeout")
            .args(["-k", "5", "600", "docker", "-H"])
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if args != ["version"] {
            eprintln!(
                "   docker {} -> {:?} in {:.1?}",
                args.join(" "),
                out.status.code(),
                start.elapsed()
            );
        }
        out
    }

    /// What husk left: its processes (shims, vmm daemons, relays, virtiofsd: their command
    /// lines name this directory; dockerd and its containerd excepted), mounts under the
    /// directory that dockerd did not hold once up, husk state entries.
    pub fn leftovers(&self) -> Vec<String> {
        let d = self.dir.path().to_string_lossy().into_owned();
        let dockerd = self.child.id() as i32;
        let mut left: Vec<String> = processes()
            .into_iter()
            .filter(|(pid, cmd)| {
                *pid != dockerd
                    && cmd.contains(&d)
                    && !cmd.starts_with("containerd ")
                    && !cmd.starts_with("containerd --config")
            })
            .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
            .collect();
        left.extend(
            mounts_under(&d)
                .into_iter()
                .filter(|m| !self.own_mounts.contains(m))
                .map(|m| format!("mount {m}")),
        );
        for root in self.husk_roots() {
            let entries: Vec<_> = std::fs::read_dir(&root)
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let entries: Vec<_> = entries
                .into_iter()
                .filter(|e| e != husk::sandbox::vm::TEMPLATES_DIR)
                .collect();
            if !entries.is_empty() {
                left.push(format!("husk state under {root:?}: {entries:?}"));
            }
        }
        left
    }

    /// The `--root`s Docker gives husk, and the shim's.
    fn husk_roots(&self) -> Vec<PathBuf> {
        let d = self.dir.path();
        let mut roots = Vec::new();
        for runtime in ["husk", "husk-vm"] {
            roots.push(
                d.join("exec")
                    .join(format!("runtime-{runtime}"))
                    .join("moby"),
            );
        }
        if let Ok(nss) = std::fs::read_dir(d.join("husk-shim")) {
            roots.extend(nss.flatten().map(|e| e.path()));
        }
        roots
    }

    /// Waits up to 20 s for everything to be gone, then asserts it is.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            crate::cli::reap_orphans();
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(self.leftovers(), Vec::<String>::new(), "left behind");
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let d = self.dir.path().to_string_lossy().into_owned();
        for (pid, cmd) in processes() {
            if cmd.contains(&d) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let mut points = mounts_under(&d);
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
