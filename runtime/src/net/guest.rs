//! What a VM sandbox does with the spec's network: which namespace to attach to, the
//! spec the guest gets, the name files (`/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`)
//! the engine bind-mounts from the host, and the cleanup that `husk delete` runs.
//!
//! - A `network` namespace with a `path` (CNI, containerd, Docker): the host attaches to
//!   that namespace ([`super::NetnsAttachment`]), the agent gives the guest's own network
//!   namespace the same interface, and the entry is removed from the guest's spec so the
//!   container stays in that namespace (the host path means nothing in the guest).
//! - A `network` namespace without a path: unchanged; the container gets a fresh
//!   namespace in the guest (the agent brings its loopback up, as runc does).
//! - Bind mounts onto the name files: the host files are copied into the sandbox share
//!   (`<share>/<id>/etc/`) and the mounts point at the copies as the guest sees them. A
//!   copy, not a bind: the share is removed without recursion, and engines write these
//!   files before `create`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use serde::{Deserialize, Serialize};

use super::{attach, tc, NetError, Netns, NetnsError};

/// The files a container engine bind-mounts from the host for name resolution.
pub const NAME_FILES: [&str; 3] = ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"];

/// A bind mount, by type or by a `bind`/`rbind` option (runc accepts either).
pub fn is_bind_mount(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// The record of an attachment, `<run dir>/net.json`: what `husk delete` removes after
/// the daemon (which may be confined and unable to run `tc`) has exited.
pub const RECORD_FILE: &str = "net.json";

/// Errors preparing the guest's spec.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum GuestSpecError {
    /// the bind mount onto {destination} names source {path:?}, which cannot be read ({error}); fix mounts[].source in config.json
    NameFile {
        destination: String,
        path: PathBuf,
        error: io::Error,
    },
    /// cannot copy {what} into the sandbox share at {path}: {error}
    Copy {
        what: String,
        path: PathBuf,
        error: io::Error,
    },
}

/// The namespace to attach to: the spec's `network` namespace, when it names a path.
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Rewrites `spec` for the guest: drops a `network` namespace that names a path (the
/// container joins the guest namespace the agent configures) and points name-file bind
/// mounts at copies in `host_dir`, which the guest sees as `guest_dir`. Returns the
/// namespace path to attach to. On error nothing is left in `host_dir`.
pub fn prepare_spec(
    spec: &mut Spec,
    host_dir: &Path,
    guest_dir: &Path,
) -> Result<Option<PathBuf>, GuestSpecError> {
    let netns = netns_path(spec);
    if netns.is_some() {
        if let Some(namespaces) = spec
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut())
        {
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        }
    }
    if let Err(e) = copy_name_files(spec, host_dir, guest_dir) {
        remove_name_files(host_dir);
        return Err(e);
    }
    Ok(netns)
}

/// Copies the spec's name files (`/etc/hosts`, ...) into `host_dir`, in the share, and
/// points their mounts at `guest_dir`, where the guest sees the copies.
pub fn copy_name_files(
    spec: &mut Spec,
    host_dir: &Path,
    guest_dir: &Path,
) -> Result<(), GuestSpecError> {
    let Some(mounts) = spec.mounts_mut().as_mut() else {
        return Ok(());
    };
    for mount in mounts.iter_mut() {
        let destination = mount.destination().to_string_lossy().into_owned();
        if !is_bind_mount(mount) || !NAME_FILES.contains(&destination.as_str()) {
            continue;
        }
        let Some(source) = mount.source().clone() else {
            continue;
        };
        let text = fs::read(&source).map_err(|error| GuestSpecError::NameFile {
            destination: destination.clone(),
            path: source.clone(),
            error,
        })?;
        let name = destination.trim_start_matches("/etc/");
        let copy = host_dir.join(name);
        let copy_err = |error| GuestSpecError::Copy {
            what: source.display().to_string(),
            path: copy.clone(),
            error,
        };
        fs::create_dir_all(host_dir).map_err(copy_err)?;
        fs::write(&copy, text).map_err(copy_err)?;
        mount.set_source(Some(guest_dir.join(name)));
    }
    Ok(())
}

/// Removes the copies [`prepare_spec`] made (and their directory). Missing is fine.
pub fn remove_name_files(host_dir: &Path) {
    for name in NAME_FILES {
        let _ = fs::remove_file(host_dir.join(name.trim_start_matches("/etc/")));
    }
    let _ = fs::remove_dir(host_dir);
}

/// What was attached, for the cleanup after the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    pub netns: PathBuf,
    /// The namespace's interface, which has our ingress qdisc.
    pub interface: String,
}

impl AttachRecord {
    pub fn write(&self, run_dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        fs::write(run_dir.join(RECORD_FILE), json)
    }

    fn read(run_dir: &Path) -> Option<Self> {
        let text = fs::read(run_dir.join(RECORD_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// Removes what an attachment recorded in `run_dir` left: the ingress qdisc (and its
/// filter) on the namespace's interface and the tap, if they are still there. A
/// namespace that is gone took them with it. The record goes once this succeeded.
pub fn remove_recorded(run_dir: &Path) -> Result<(), NetError> {
    let Some(record) = AttachRecord::read(run_dir) else {
        return Ok(());
    };
    let netns = match Netns::open(&record.netns) {
        Ok(netns) => Some(netns),
        Err(NetnsError::Missing(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(netns) = netns {
        for dev in [record.interface.as_str(), attach::TAP_NAME] {
            match tc::remove(&netns, dev) {
                Ok(()) => {}
                Err(NetError::Command { stderr, .. })
                    if stderr.contains("Cannot find device")
                        || stderr.contains("Cannot find specified qdisc")
                        || stderr.contains("Invalid handle") => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = attach::delete_tap(&netns) {
            return Err(e);
        }
    }
    let _ = fs::remove_file(run_dir.join(RECORD_FILE));
    Ok(())
}

/// Everything a VM sandbox's network left on the host: the recorded attachment in
/// `run_dir` and the name-file copies in `name_files`. For `husk delete` and a failed
/// create; missing pieces are fine.
pub fn cleanup(run_dir: &Path, name_files: &Path) -> Result<(), NetError> {
    remove_name_files(name_files);
    remove_recorded(run_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, MountBuilder, SpecBuilder};

    fn spec(netns: Option<&str>, mounts: Vec<oci_spec::runtime::Mount>) -> Spec {
        let mut network = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
        if let Some(p) = netns {
            network = network.path(p);
        }
        let namespaces = vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Pid)
                .build()
                .unwrap(),
            network.build().unwrap(),
        ];
        SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(namespaces)
                    .build()
                    .unwrap(),
            )
            .mounts(mounts)
            .build()
            .unwrap()
    }

    fn bind(destination: &str, source: &Path) -> oci_spec::runtime::Mount {
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap()
    }

    fn namespace_types(spec: &Spec) -> Vec<LinuxNamespaceType> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect()
    }

    #[test]
    fn a_network_namespace_path_is_attached_and_left_out_of_the_guest_spec() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some("/run/netns/cni-1"), vec![]);
        let netns = prepare_spec(&mut s, dir.path(), Path::new("/g")).unwrap();
        assert_eq!(netns, Some(PathBuf::from("/run/netns/cni-1")));
        assert_eq!(namespace_types(&s), vec![LinuxNamespaceType::Pid]);
    }

    #[test]
    fn a_network_namespace_without_path_stays_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(None, vec![]);
        assert_eq!(
            prepare_spec(&mut s, dir.path(), Path::new("/g")).unwrap(),
            None
        );
        assert_eq!(
            namespace_types(&s),
            vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Network]
        );
    }

    #[test]
    fn name_file_binds_point_at_copies_in_the_share() {
        let host = tempfile::tempdir().unwrap();
        let resolv = host.path().join("resolv.conf");
        fs::write(&resolv, "nameserver 10.0.0.53\n").unwrap();
        let hosts = host.path().join("hosts");
        fs::write(&hosts, "10.0.0.2 web\n").unwrap();
        let other = bind("/data", host.path());
        let share = host.path().join("share-c1-etc");
        let mut s = spec(
            None,
            vec![
                bind("/etc/resolv.conf", &resolv),
                bind("/etc/hosts", &hosts),
                other,
            ],
        );
        prepare_spec(&mut s, &share, Path::new("/run/husk/share/c1/etc")).unwrap();
        let sources: Vec<PathBuf> = s
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.source().clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            vec![
                PathBuf::from("/run/husk/share/c1/etc/resolv.conf"),
                PathBuf::from("/run/husk/share/c1/etc/hosts"),
                host.path().to_path_buf(),
            ]
        );
        assert_eq!(
            fs::read_to_string(share.join("resolv.conf")).unwrap(),
            "nameserver 10.0.0.53\n"
        );
        assert_eq!(
            fs::read_to_string(share.join("hosts")).unwrap(),
            "10.0.0.2 web\n"
        );
        remove_name_files(&share);
        assert!(!share.exists());
    }

    #[test]
    fn a_missing_name_file_is_named_and_nothing_is_left() {
        let host = tempfile::tempdir().unwrap();
        let hosts = host.path().join("hosts");
        fs::write(&hosts, "x").unwrap();
        let share = host.path().join("etc");
        let mut s = spec(
            None,
            vec![
                bind("/etc/hosts", &hosts),
                bind("/etc/resolv.conf", &host.path().join("nope")),
            ],
        );
        let err = prepare_spec(&mut s, &share, Path::new("/g"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/resolv.conf") && err.contains("nope"),
            "{err}"
        );
        assert!(!share.exists(), "the copy of hosts was left behind");
    }

    #[test]
    fn no_record_means_nothing_to_remove() {
        let dir = tempfile::tempdir().unwrap();
        remove_recorded(dir.path()).unwrap();
    }
}
