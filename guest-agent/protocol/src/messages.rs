//! Requests the host sends on the control port and the agent's responses.
//!
//! One request, then one response, per control connection at a time. The host gets
//! concurrency by opening more control connections (each starts with `Hello`): a
//! `WaitProcess` blocks only its own connection.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// Version of the messages in this module. Bump it on any incompatible change: the
/// `Hello` exchange then fails with [`AgentError::VersionMismatch`] on both sides instead of
/// a confusing decode error later.
pub const PROTOCOL_VERSION: u32 = 3;

/// Which standard streams the host wants for a new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StdioRequest {
    /// Give the process a stdin stream; without it the process reads `/dev/null`.
    pub stdin: bool,
}

/// The ports the agent listens on for one process's streams; the host connects to each
/// once. With a terminal (`process.terminal`), `pty` carries both directions and the
/// others are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StdioPorts {
    pub stdin: Option<u32>,
    pub stdout: Option<u32>,
    pub stderr: Option<u32>,
    pub pty: Option<u32>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal with this number killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
        }
    }
}

/// Names one process: a container's init (`exec_id: None`) or one of its execs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub container_id: String,
    pub exec_id: Option<String>,
}

/// An IPv4 address with its prefix length, as in `10.200.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// One route through a guest interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Route {
    /// `None` is the default route.
    pub dest: Option<Ipv4Net>,
    /// `None` for a route to a directly attached network.
    pub gateway: Option<Ipv4Addr>,
}

/// A guest network interface, configured as the container engine configured the
/// interface in the container's network namespace on the host. IPv4 only: the guest
/// kernel has no IPv6.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The name the interface gets in the guest (the namespace interface's name).
    pub name: String,
    /// The virtio-net device's MAC address; the agent finds the guest interface by it.
    pub mac: [u8; 6],
    pub mtu: u16,
    pub addresses: Vec<Ipv4Net>,
    /// In the order they must be added (routes to directly attached networks first).
    pub routes: Vec<Ipv4Route>,
}

/// The guest's network: what `ConfigureNetwork` applies in the guest's own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkConfig {
    pub interfaces: Vec<NetInterface>,
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Must be the first message on every control connection.
    Hello {
        version: u32,
    },
    Ping,
    /// Creates a container and holds it at the exec barrier until `StartContainer`.
    /// `rootfs` is the root filesystem as the agent sees it; it overrides `spec.root.path`.
    CreateContainer {
        id: String,
        spec: Box<Spec>,
        rootfs: PathBuf,
        stdio: StdioRequest,
        /// A member of a pod: the id of the pod's sandbox container in this guest. Each
        /// namespace of `spec` that names a path (the host's view of the pod's namespace)
        /// joins the sandbox container's namespace of that kind instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod_sandbox: Option<String>,
    },
    StartContainer {
        id: String,
    },
    /// Runs another process in a running container.
    ExecProcess {
        container_id: String,
        exec_id: String,
        process: Box<Process>,
        stdio: StdioRequest,
    },
    SignalProcess {
        process: ProcessRef,
        signal: i32,
    },
    /// Blocks until the process has exited.
    WaitProcess {
        process: ProcessRef,
    },
    ResizePty {
        process: ProcessRef,
        rows: u16,
        cols: u16,
    },
    Stats {
        container_id: String,
    },
    /// Removes a container's state and cgroup; `force` kills it first if it still runs.
    DeleteContainer {
        id: String,
        force: bool,
    },
    /// Kills every container and powers the VM off (on the host: the agent exits).
    Shutdown,
    /// Configures the guest's network interfaces (addresses, MTU, routes) in the guest's
    /// own network namespace; sent before `CreateContainer` for containers that share it.
    ConfigureNetwork {
        config: NetworkConfig,
    },
    /// Mounts the virtio-fs share with `tag` at `mountpoint` in the guest (created if
    /// missing). A request rather than a boot-time step, so a guest restored from a
    /// snapshot can attach the share it is given after the restore. Containers then use
    /// `<mountpoint>/<container id>/rootfs` as their rootfs.
    MountShare {
        tag: String,
        mountpoint: PathBuf,
        readonly: bool,
    },
    /// The pids (in the guest's pid namespace) of every process in a container's cgroup.
    ListProcesses {
        container_id: String,
    },
    /// Sends `signal` to every process of a container (`kill --all`), not just its init.
    SignalContainer {
        container_id: String,
        signal: i32,
    },
    /// Applies new cgroup limits to a running container (`update`).
    UpdateContainer {
        container_id: String,
        resources: Box<LinuxResources>,
    },
    /// Sent first to a guest restored from a snapshot: every guest restored from one
    /// template starts with the same clock and the same random-generator state, so the
    /// host gives each its wall-clock time and fresh entropy (which the agent credits and
    /// then forces a reseed of the kernel's generator with).
    RefreshAfterRestore {
        /// Nanoseconds since the Unix epoch on the host.
        realtime_ns: u64,
        /// At least 32 bytes from the host's random generator.
        entropy: Vec<u8>,
    },
}

/// The agent's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
    },
    Pong,
    /// The process exists (a created container's init, or a started exec).
    Spawned {
        pid: i32,
        stdio: StdioPorts,
    },
    /// The request succeeded and has nothing to report.
    Done,
    Exited {
        status: ExitStatus,
    },
    /// Answer to `ListProcesses`, sorted.
    Processes {
        pids: Vec<i32>,
    },
    /// libcgroups' statistics of the container's cgroup, as JSON.
    Stats {
        stats: serde_json::Value,
    },
    Error {
        error: AgentError,
    },
}

impl Request {
    /// The message's name, for logs and errors (without its possibly large body).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::CreateContainer { .. } => "create_container",
            Request::StartContainer { .. } => "start_container",
            Request::ExecProcess { .. } => "exec_process",
            Request::SignalProcess { .. } => "signal_process",
            Request::WaitProcess { .. } => "wait_process",
            Request::ResizePty { .. } => "resize_pty",
            Request::Stats { .. } => "stats",
            Request::DeleteContainer { .. } => "delete_container",
            Request::Shutdown => "shutdown",
            Request::ConfigureNetwork { .. } => "configure_network",
            Request::MountShare { .. } => "mount_share",
            Request::ListProcesses { .. } => "list_processes",
            Request::SignalContainer { .. } => "signal_container",
            Request::UpdateContainer { .. } => "update_container",
            Request::RefreshAfterRestore { .. } => "refresh_after_restore",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{read_frame, write_frame};

    #[test]
    fn configure_network_round_trips_through_a_frame() {
        let net = |a: [u8; 4], prefix_len| Ipv4Net {
            addr: Ipv4Addr::from(a),
            prefix_len,
        };
        let request = Request::ConfigureNetwork {
            config: NetworkConfig {
                interfaces: vec![NetInterface {
                    name: "eth0".into(),
                    mac: [0x02, 0x42, 0xac, 0x11, 0x00, 0x02],
                    mtu: 1450,
                    addresses: vec![net([10, 200, 0, 2], 24)],
                    routes: vec![
                        Ipv4Route {
                            dest: Some(net([10, 9, 0, 0], 16)),
                            gateway: None,
                        },
                        Ipv4Route {
                            dest: None,
                            gateway: Some(Ipv4Addr::new(10, 200, 0, 1)),
                        },
                    ],
                }],
            },
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &request).unwrap();
        let back: Request = read_frame(&mut wire.as_slice()).unwrap();
        assert_eq!(back, request);
        assert_eq!(back.name(), "configure_network");
        // The wire form is readable JSON: addresses as dotted quads, the tag in "type".
        let json: serde_json::Value = serde_json::to_value(&request).unwrap();
        assert_eq!(json["type"], "configure_network");
        let iface = &json["config"]["interfaces"][0];
        assert_eq!(iface["addresses"][0]["addr"], "10.200.0.2");
        assert_eq!(iface["routes"][1]["dest"], serde_json::Value::Null);
    }

    #[test]
    fn configure_network_with_a_bad_address_is_a_decode_error() {
        let bad = r#"{"type":"configure_network","config":{"interfaces":[{"name":"eth0",
            "mac":[2,0,0,0,0,1],"mtu":1500,"addresses":[{"addr":"10.0.0.300","prefix_len":8}],
            "routes":[]}]}}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
    }
}
