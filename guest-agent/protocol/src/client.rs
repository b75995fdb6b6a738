//! The host's side of the control protocol.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};

use crate::connector::{ConnectError, Connector};
use crate::error::AgentError;
use crate::framing::{read_frame, write_frame, FrameError};
use crate::handshake::{client_hello, HandshakeError};
use crate::messages::{
    ExitStatus, ProcessRef, Request, Response, StdioPorts, StdioRequest, PROTOCOL_VERSION,
};
use crate::CONTROL_PORT;

/// Errors of one call to the agent.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ClientError {
    /// cannot reach the agent: {0}
    Connect(#[from] ConnectError),
    /// handshake with the agent failed: {0}
    Handshake(#[from] HandshakeError),
    /// talking to the agent failed (did it crash? see the guest console): {0}
    Frame(#[from] FrameError),
    /// the agent answered: {0}
    Agent(#[source] AgentError),
    /// the agent answered {request} with an unexpected {response}
    UnexpectedResponse {
        request: &'static str,
        response: String,
    },
}

/// A process the agent spawned: its pid in the agent's pid namespace and its stream ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: i32,
    pub stdio: StdioPorts,
}

/// One control connection: requests are answered in order. Open more clients for
/// concurrent blocking calls such as [`AgentClient::wait_process`].
pub struct AgentClient<S = UnixStream> {
    stream: S,
}

/// How many times a connection that closes before answering `Hello` is opened again.
const HANDSHAKE_ATTEMPTS: u32 = 3;

impl AgentClient<UnixStream> {
    /// Connects to the control port and does the `Hello` exchange.
    pub fn connect(connector: &dyn Connector) -> Result<Self, ClientError> {
        Self::connect_with_read_timeout(connector, None)
    }

    /// [`Self::connect`] whose reads (the handshake's and every call's) time out after
    /// `timeout` instead of blocking forever.
    ///
    /// A stream that the guest closes before answering `Hello` is opened again, a few
    /// times: nothing was asked yet, so retrying cannot repeat a request. The guest's
    /// vsock has been seen to close a freshly accepted stream this way, rarely, under load.
    pub fn connect_with_read_timeout(
        connector: &dyn Connector,
        timeout: Option<std::time::Duration>,
    ) -> Result<Self, ClientError> {
        let mut attempt = 1;
        loop {
            let stream = connector.connect(CONTROL_PORT)?;
            stream
                .set_read_timeout(timeout)
                .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
            match Self::handshake(stream) {
                Err(ClientError::Handshake(HandshakeError::Frame(FrameError::Closed)))
                    if attempt < HANDSHAKE_ATTEMPTS =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl<S: Read + Write> AgentClient<S> {
    /// Does the `Hello` exchange on an already open stream.
    pub fn handshake(mut stream: S) -> Result<Self, ClientError> {
        client_hello(&mut stream, PROTOCOL_VERSION)?;
        Ok(Self { stream })
    }

    /// Sends one request and returns the agent's response; `Response::Error` becomes
    /// [`ClientError::Agent`].
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        write_frame(&mut self.stream, request)?;
        match read_frame(&mut self.stream)? {
            Response::Error { error } => Err(ClientError::Agent(error)),
            response => Ok(response),
        }
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        let request = Request::Ping;
        match self.call(&request)? {
            Response::Pong => Ok(()),
            other => Err(unexpected(&request, other)),
        }
    }

    pub fn create_container(
        &mut self,
        id: &str,
        spec: Spec,
        rootfs: impl Into<PathBuf>,
        stdio: StdioRequest,
    ) -> Result<Spawned, ClientError> {
        self.create_pod_member(id, spec, rootfs, stdio, None)
    }

    /// Creates a container; with `pod_sandbox`, as a member of that sandbox container's
    /// pod (see [`Request::CreateContainer`]).
    pub fn create_pod_member(
        &mut self,
        id: &str,
        spec: Spec,
        rootfs: impl Into<PathBuf>,
        stdio: StdioRequest,
        pod_sandbox: Option<&str>,
    ) -> Result<Spawned, ClientError> {
        let request = Request::CreateContainer {
            id: id.to_owned(),
            spec: Box::new(spec),
            rootfs: rootfs.into(),
            stdio,
            pod_sandbox: pod_sandbox.map(str::to_owned),
        };
        self.expect_spawned(&request)
    }

    pub fn start_container(&mut self, id: &str) -> Result<(), ClientError> {
        self.expect_done(&Request::StartContainer { id: id.to_owned() })
    }

    pub fn exec_process(
        &mut self,
        container_id: &str,
        exec_id: &str,
        process: Process,
        stdio: StdioRequest,
    ) -> Result<Spawned, ClientError> {
        let request = Request::ExecProcess {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process: Box::new(process),
            stdio,
        };
        self.expect_spawned(&request)
    }

    pub fn signal_process(&mut self, process: ProcessRef, signal: i32) -> Result<(), ClientError> {
        self.expect_done(&Request::SignalProcess { process, signal })
    }

    pub fn wait_process(&mut self, process: ProcessRef) -> Result<ExitStatus, ClientError> {
        let request = Request::WaitProcess { process };
        match self.call(&request)? {
            Response::Exited { status } => Ok(status),
            other => Err(unexpected(&request, other)),
        }
    }

    pub fn resize_pty(
        &mut self,
        process: ProcessRef,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        self.expect_done(&Request::ResizePty {
            process,
            rows,
            cols,
        })
    }

    pub fn stats(&mut self, container_id: &str) -> Result<serde_json::Value, ClientError> {
        let request = Request::Stats {
            container_id: container_id.to_owned(),
        };
        match self.call(&request)? {
            Response::Stats { stats } => Ok(stats),
            other => Err(unexpected(&request, other)),
        }
    }

    /// The guest pids of the container's processes, sorted.
    pub fn list_processes(&mut self, container_id: &str) -> Result<Vec<i32>, ClientError> {
        let request = Request::ListProcesses {
            container_id: container_id.to_owned(),
        };
        match self.call(&request)? {
            Response::Processes { pids } => Ok(pids),
            other => Err(unexpected(&request, other)),
        }
    }

    /// Sends `signal` to every process of the container.
    pub fn signal_container(&mut self, container_id: &str, signal: i32) -> Result<(), ClientError> {
        self.expect_done(&Request::SignalContainer {
            container_id: container_id.to_owned(),
            signal,
        })
    }

    /// Applies new cgroup limits to the container.
    pub fn update_container(
        &mut self,
        container_id: &str,
        resources: oci_spec::runtime::LinuxResources,
    ) -> Result<(), ClientError> {
        self.expect_done(&Request::UpdateContainer {
            container_id: container_id.to_owned(),
            resources: Box::new(resources),
        })
    }

    /// Gives a guest restored from a snapshot the host's time and fresh entropy.
    pub fn refresh_after_restore(
        &mut self,
        realtime_ns: u64,
        entropy: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.expect_done(&Request::RefreshAfterRestore {
            realtime_ns,
            entropy,
        })
    }

    pub fn delete_container(&mut self, id: &str, force: bool) -> Result<(), ClientError> {
        self.expect_done(&Request::DeleteContainer {
            id: id.to_owned(),
            force,
        })
    }

    /// Mounts the virtio-fs share `tag` at `mountpoint` in the guest.
    pub fn mount_share(
        &mut self,
        tag: &str,
        mountpoint: impl Into<PathBuf>,
        readonly: bool,
    ) -> Result<(), ClientError> {
        self.expect_done(&Request::MountShare {
            tag: tag.to_owned(),
            mountpoint: mountpoint.into(),
            readonly,
        })
    }

    /// Gives the guest's network namespace the interfaces in `config` (matched by MAC).
    pub fn configure_network(
        &mut self,
        config: crate::messages::NetworkConfig,
    ) -> Result<(), ClientError> {
        self.expect_done(&Request::ConfigureNetwork { config })
    }

    /// Asks the agent to kill everything and power off. The connection may close before
    /// the answer arrives, which counts as success.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        match self.expect_done(&Request::Shutdown) {
            Err(ClientError::Frame(FrameError::Closed)) => Ok(()),
            other => other,
        }
    }

    fn expect_done(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.call(request)? {
            Response::Done => Ok(()),
            other => Err(unexpected(request, other)),
        }
    }

    fn expect_spawned(&mut self, request: &Request) -> Result<Spawned, ClientError> {
        match self.call(request)? {
            Response::Spawned { pid, stdio } => Ok(Spawned { pid, stdio }),
            other => Err(unexpected(request, other)),
        }
    }
}

fn unexpected(request: &Request, response: Response) -> ClientError {
    ClientError::UnexpectedResponse {
        request: request.name(),
        response: format!("{response:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::handshake::server_hello;

    /// A scripted agent: answers the handshake, then each request with the next response.
    fn scripted_agent(responses: Vec<Response>) -> (UnixStream, thread::JoinHandle<Vec<Request>>) {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            server_hello(&mut agent, PROTOCOL_VERSION).unwrap();
            let mut seen = Vec::new();
            for response in responses {
                seen.push(read_frame(&mut agent).unwrap());
                write_frame(&mut agent, &response).unwrap();
            }
            seen
        });
        (host, handle)
    }

    #[test]
    fn typed_calls_map_responses_and_errors() {
        let not_found = AgentError::ContainerNotFound { id: "ghost".into() };
        let (stream, agent) = scripted_agent(vec![
            Response::Exited {
                status: ExitStatus::Signaled(9),
            },
            Response::Error {
                error: not_found.clone(),
            },
            Response::Pong,
        ]);
        let mut client = AgentClient::handshake(stream).unwrap();
        let init = ProcessRef {
            container_id: "c".into(),
            exec_id: None,
        };
        assert_eq!(
            client.wait_process(init.clone()).unwrap(),
            ExitStatus::Signaled(9)
        );
        match client.start_container("ghost") {
            Err(ClientError::Agent(e)) => assert_eq!(e, not_found),
            other => panic!("expected the agent's error, got {other:?}"),
        }
        // A reply of the wrong kind is an error, not a silent success.
        assert!(matches!(
            client.start_container("c"),
            Err(ClientError::UnexpectedResponse {
                request: "start_container",
                ..
            })
        ));
        let seen = agent.join().unwrap();
        assert_eq!(seen[0], Request::WaitProcess { process: init });
        assert_eq!(seen[1], Request::StartContainer { id: "ghost".into() });
    }

    #[test]
    fn agent_vanishing_mid_call_is_an_error_not_a_hang() {
        let (stream, agent) = scripted_agent(vec![]);
        let mut client = AgentClient::handshake(stream).unwrap();
        agent.join().unwrap();
        assert!(matches!(client.ping(), Err(ClientError::Frame(_))));
    }

    /// Hands out pre-made streams, counting the connects.
    struct QueuedConnector(std::sync::Mutex<Vec<UnixStream>>);

    impl Connector for QueuedConnector {
        fn connect(&self, port: u32) -> Result<UnixStream, ConnectError> {
            assert_eq!(port, CONTROL_PORT);
            self.0.lock().unwrap().pop().ok_or(ConnectError::Refused {
                port,
                reply: "no more streams".into(),
            })
        }
    }

    /// An agent end that takes the `Hello` and closes without answering.
    fn closing_agent() -> UnixStream {
        let (host, mut agent) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let _: Result<Request, _> = read_frame(&mut agent);
        });
        host
    }

    #[test]
    fn a_stream_closed_before_hello_is_opened_again() {
        let closed_host = closing_agent();
        let (good, agent) = scripted_agent(vec![Response::Pong]);
        // Popped from the back: the closed stream comes first.
        let connector = QueuedConnector(std::sync::Mutex::new(vec![good, closed_host]));
        let mut client = AgentClient::connect_with_read_timeout(
            &connector,
            Some(std::time::Duration::from_secs(5)),
        )
        .unwrap();
        client.ping().unwrap();
        agent.join().unwrap();
    }

    #[test]
    fn streams_that_keep_closing_give_up_with_the_handshake_error() {
        let streams = (0..HANDSHAKE_ATTEMPTS + 1)
            .map(|_| closing_agent())
            .collect();
        let connector = QueuedConnector(std::sync::Mutex::new(streams));
        match AgentClient::connect(&connector) {
            Err(ClientError::Handshake(HandshakeError::Frame(FrameError::Closed))) => {}
            other => panic!("expected the handshake error, got {:?}", other.map(|_| ())),
        }
        // Exactly HANDSHAKE_ATTEMPTS connects were made.
        assert_eq!(connector.0.lock().unwrap().len(), 1);
    }
}
