//! The shim's actions, as containerd 1.6/1.7 run them: `start` (spawn the serving
//! instance, one per pod, and print its address), `delete` (clean up after an instance
//! that died) and the serving instance itself.
//!
//! The `containerd-shim` crate's `run()` speaks the newer protocol of containerd 2.x (a
//! JSON `start` answer, Task API `containerd.task.v3`), which containerd 1.6 cannot use.
//! So this module drives the crate's pieces (spawn, logger, publisher, the generated
//! Task service) itself, and serves the Task API under both v2 and v3 names: the
//! messages are the same.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::ttrpc::{self, MethodHandler};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::events::Events;
use crate::pod::{self, Role};
use crate::service::TaskService;
use crate::tasks::{TaskError, Tasks};

/// Errors of the shim's actions.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ShimError {
    /// the shim needs -namespace and -id (containerd passes them)
    MissingFlags,
    /// reading the working directory (the bundle) failed: {0}
    Cwd(std::io::Error),
    /// {0}
    Crate(#[from] containerd_shim::Error),
    /// ttrpc: {0}
    Ttrpc(#[from] ttrpc::Error),
    /// {0}
    Tasks(#[from] TaskError),
    /// binding the shim socket {path:?} failed: {source}
    Bind {
        path: String,
        source: std::io::Error,
    },
    /// TTRPC_ADDRESS is not set: containerd sets it when it runs the shim
    NoTtrpcAddress,
    /// writing the answer to containerd failed: {0}
    Answer(std::io::Error),
}

fn bundle() -> Result<std::path::PathBuf, ShimError> {
    std::env::current_dir().map_err(ShimError::Cwd)
}

/// `start`: spawns the serving instance for the container's pod (the CRI sandbox id
/// picks the socket, so a pod's containers share one instance) and prints its address
/// bare, as containerd 1.6 reads it.
pub fn start(flags: &Flags) -> Result<(), ShimError> {
    // A bad HUSK_ISOLATION is reported here, where containerd shows the shim's output.
    crate::tasks::default_isolation()?;
    let bundle = bundle()?;
    let grouping = Role::of(&flags.id, &pod::annotations(&bundle)).grouping(&flags.id);
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
    containerd_shim::util::write_address(&address)?;
    let mut out = std::io::stdout().lock();
    out.write_all(address.as_bytes())
        .map_err(ShimError::Answer)?;
    out.flush().map_err(ShimError::Answer)
}

/// `delete`: containerd lost the instance; remove what the container left and report
/// it killed.
pub fn delete(flags: &Flags) -> Result<(), ShimError> {
    let tasks = Tasks::new(Events::none(&flags.namespace))?;
    tasks.force_delete(&flags.id, &bundle()?);
    let answer = DeleteResponse {
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(std::time::SystemTime::now().into()).into(),
        ..Default::default()
    };
    let bytes = answer
        .write_to_bytes()
        .map_err(|e| ShimError::Crate(containerd_shim::Error::Other(e.to_string())))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes).map_err(ShimError::Answer)?;
    out.flush().map_err(ShimError::Answer)
}

/// The Task API methods under the v2 names (containerd 1.6/1.7) as well as v3.
fn methods(service: TaskService) -> HashMap<String, Box<dyn MethodHandler + Send + Sync>> {
    let v3 = containerd_shim::protos::create_task(Arc::new(service));
    let mut all = HashMap::new();
    for (name, handler) in v3 {
        let v2 = name.replace("/containerd.task.v3.Task/", "/containerd.task.v2.Task/");
        let handler: Arc<dyn MethodHandler + Send + Sync> = Arc::from(handler);
        all.insert(v2, Box::new(Shared(Arc::clone(&handler))) as Box<_>);
        all.insert(name, Box::new(Shared(handler)) as Box<_>);
    }
    all
}

/// One handler registered under two names.
struct Shared(Arc<dyn MethodHandler + Send + Sync>);

impl MethodHandler for Shared {
    fn handler(&self, ctx: ttrpc::TtrpcContext, req: ttrpc::Request) -> ttrpc::Result<()> {
        self.0.handler(ctx, req)
    }
}

/// The serving instance: listens on `-socket`, serves until the last container is gone
/// and containerd asks it to shut down.
pub fn serve(flags: &Flags) -> Result<(), ShimError> {
    if flags.namespace.is_empty() || flags.socket.is_empty() {
        return Err(ShimError::MissingFlags);
    }
    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    if let Some(dir) = Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                // The pod's instance is already serving: `start` answers with its address.
                release_start();
                return Ok(());
            }
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|source| ShimError::Bind {
                path: path.clone(),
                source,
            })?
        }
        Err(source) => return Err(ShimError::Bind { path, source }),
    };
    // Container processes that libcontainer double-forks, and the vmm daemon, are
    // reparented to the shim, which waits for them (process.rs).
    let _ = nix::sys::prctl::set_child_subreaper(true);
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        eprintln!("containerd-shim-husk-v2: no log: {e}");
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| ShimError::NoTtrpcAddress)?;
    let publisher = RemotePublisher::new(&ttrpc_address)?;
    let exit = Arc::new(ExitSignal::default());
    let service = TaskService {
        tasks: Arc::new(Tasks::new(Events::new(publisher, &flags.namespace))?),
        exit: Arc::clone(&exit),
    };
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())?
        .register_service(methods(service));
    server.start()?;
    release_start();
    log::info!("serving {} on {}", flags.id, flags.socket);
    exit.wait();
    server.shutdown();
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Closes stdout, the pipe the `start` action reads until EOF, so it can answer.
fn release_start() {
    // SAFETY: dup2 on the process's own standard descriptors; no Rust object owns fd 1.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
