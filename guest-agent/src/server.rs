//! The control server: one thread per host connection, one request at a time on each.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use husk_protocol::framing::{read_frame, write_frame, FrameError};
use husk_protocol::handshake::{server_hello, HandshakeError};
use husk_protocol::{AgentError, Request, Response, PROTOCOL_VERSION};

use crate::containers::Agent;
use crate::init::log;
use crate::transport::{Listener, Stream};

/// What the server loop should do after a request.
enum After {
    Continue,
    Shutdown,
}

/// Accepts control connections forever; returns when a `Shutdown` has been answered.
pub fn serve(agent: Arc<Agent>, listener: Listener) -> std::io::Result<()> {
    let (shutdown_tx, shutdown_rx) = std::sync::mpsc::channel::<()>();
    let acceptor = {
        let agent = agent.clone();
        thread::Builder::new()
            .name("accept".into())
            .spawn(move || loop {
                match listener.accept() {
                    Ok(stream) => {
                        let agent = agent.clone();
                        let shutdown_tx = shutdown_tx.clone();
                        let spawned =
                            thread::Builder::new()
                                .name("control".into())
                                .spawn(move || {
                                    if let After::Shutdown = handle_connection(&agent, stream) {
                                        let _ = shutdown_tx.send(());
                                    }
                                });
                        if let Err(e) = spawned {
                            log(&format!("cannot start a control thread: {e}"));
                        }
                    }
                    Err(e) => log(&format!("accepting a control connection failed: {e}")),
                }
            })?
    };
    drop(acceptor);
    // Every sender lives in the acceptor thread, which never ends, so this only returns on
    // a shutdown request.
    let _ = shutdown_rx.recv();
    Ok(())
}

fn handle_connection(agent: &Agent, mut stream: Stream) -> After {
    match server_hello(&mut stream, PROTOCOL_VERSION) {
        Ok(()) => {}
        // A probe that connects and leaves (the host checking we listen) is not an error.
        Err(HandshakeError::Frame(FrameError::Closed)) => return After::Continue,
        Err(e) => {
            log(&format!("control connection refused: {e}"));
            return After::Continue;
        }
    }
    loop {
        let request: Request = match read_frame(&mut stream) {
            Ok(request) => request,
            Err(FrameError::Closed) => return After::Continue,
            Err(e) => {
                // Tell the host what was wrong with its frame before giving up on the stream.
                let error = AgentError::InvalidRequest {
                    reason: e.to_string(),
                };
                let _ = write_frame(&mut stream, &Response::Error { error });
                return After::Continue;
            }
        };
        let is_shutdown = matches!(request, Request::Shutdown);
        let name = request.name();
        // In debug builds a panic in a handler becomes an error response; release builds
        // abort on panic (the panic hook logs it, and the host sees the connection close).
        let response =
            catch_unwind(AssertUnwindSafe(|| dispatch(agent, request))).unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(AgentError::Internal {
                    message: format!("handling {name} panicked: {message}"),
                })
            });
        let response = response.unwrap_or_else(|error| {
            log(&format!("{name} failed: {error}"));
            Response::Error { error }
        });
        if let Err(e) = write_frame(&mut stream, &response) {
            log(&format!("answering {name} failed: {e}"));
            return After::Continue;
        }
        if is_shutdown {
            return After::Shutdown;
        }
    }
}

fn dispatch(agent: &Agent, request: Request) -> Result<Response, AgentError> {
    match request {
        Request::Hello { .. } => Err(AgentError::InvalidRequest {
            reason: "Hello was already exchanged on this connection".into(),
        }),
        Request::Ping => Ok(Response::Pong),
        Request::CreateContainer {
            id,
            spec,
            rootfs,
            stdio,
            pod_sandbox,
        } => agent.create_container(&id, *spec, &rootfs, stdio, pod_sandbox.as_deref()),
        Request::StartContainer { id } => agent.start_container(&id),
        Request::ExecProcess {
            container_id,
            exec_id,
            process,
            stdio,
        } => agent.exec_process(&container_id, &exec_id, *process, stdio),
        Request::SignalProcess { process, signal } => agent.signal_process(&process, signal),
        Request::WaitProcess { process } => agent.wait_process(&process),
        Request::ResizePty {
            process,
            rows,
            cols,
        } => agent.resize_pty(&process, rows, cols),
        Request::Stats { container_id } => agent.stats(&container_id),
        Request::ListProcesses { container_id } => agent.list_processes(&container_id),
        Request::SignalContainer {
            container_id,
            signal,
        } => agent.signal_container(&container_id, signal),
        Request::UpdateContainer {
            container_id,
            resources,
        } => agent.update_container(&container_id, &resources),
        Request::DeleteContainer { id, force } => agent.delete_container(&id, force),
        Request::Shutdown => {
            agent.delete_all();
            Ok(Response::Done)
        }
        Request::ConfigureNetwork { config } => configure_network(&config),
        Request::MountShare {
            tag,
            mountpoint,
            readonly,
        } => crate::share::mount_share(&tag, &mountpoint, readonly),
        Request::RefreshAfterRestore {
            realtime_ns,
            entropy,
        } => crate::restored::refresh(realtime_ns, &entropy),
    }
}

/// Only PID 1 owns the network it would change: on the host (tier-2 tests) the same
/// request would reconfigure the host's own interfaces.
fn configure_network(
    config: &husk_protocol::messages::NetworkConfig,
) -> Result<Response, AgentError> {
    if std::process::id() != 1 {
        return Err(AgentError::Unsupported {
            what: "ConfigureNetwork outside a VM (it would change the host's interfaces)".into(),
        });
    }
    crate::network::configure(config).map_err(|e| match e {
        crate::network::NetworkError::NoInterface { .. } => AgentError::InvalidRequest {
            reason: e.to_string(),
        },
        e => AgentError::Io {
            context: "configuring the guest network".into(),
            message: e.to_string(),
        },
    })?;
    Ok(Response::Done)
}
