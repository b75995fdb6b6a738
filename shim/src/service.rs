//! The Task API (ttrpc) that containerd calls: each method unpacks the request, calls
//! [`Tasks`], and packs the answer; errors go back with the status code containerd
//! expects (NotFound, AlreadyExists, ...) and a message that names the fix.

use std::sync::Arc;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use husk::oci::Status;

use crate::process::Exit;
use crate::stdio::Paths;
use crate::tasks::{is_not_found, TaskError, Tasks};

/// Serves the Task API for the containers of one shim instance (one pod).
pub struct TaskService {
    pub tasks: Arc<Tasks>,
    pub exit: Arc<ExitSignal>,
}

fn status(e: TaskError) -> ttrpc::Error {
    let code = if is_not_found(&e) {
        Code::NOT_FOUND
    } else {
        match e {
            TaskError::Exists(_) | TaskError::ExecExists { .. } => Code::ALREADY_EXISTS,
            TaskError::BadSpec { .. } => Code::INVALID_ARGUMENT,
            TaskError::Running(_) => Code::FAILED_PRECONDITION,
            TaskError::Checkpoint => Code::UNIMPLEMENTED,
            _ => Code::UNKNOWN,
        }
    };
    log::warn!("{e}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn api_status(s: Status) -> api::Status {
    match s {
        Status::Creating => api::Status::UNKNOWN,
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

fn timestamp(
    exit: &Exit,
) -> MessageField<containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp> {
    Some(exit.at.into()).into()
}

/// The JSON containerd packs into an `Any` (OCI types travel as JSON, not protobuf).
fn any_json(any: &MessageField<Any>) -> Vec<u8> {
    any.as_ref().map(|a| a.value.clone()).unwrap_or_default()
}

impl Task for TaskService {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let s = self.tasks.state(&req.id, &req.exec_id).map_err(status)?;
        Ok(api::StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: s.bundle.to_string_lossy().into_owned(),
            pid: s.pid,
            status: api_status(s.status).into(),
            stdin: s.paths.stdin,
            stdout: s.paths.stdout,
            stderr: s.paths.stderr,
            terminal: s.paths.terminal,
            exit_status: s.exit.map(|e| e.code).unwrap_or(0),
            exited_at: s.exit.as_ref().map(timestamp).unwrap_or_default(),
            ..Default::default()
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(status(TaskError::Checkpoint));
        }
        let paths = Paths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let pid = self
            .tasks
            .create(
                &req.id,
                std::path::Path::new(&req.bundle),
                &req.rootfs,
                paths,
            )
            .map_err(status)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.tasks.start(&req.id, &req.exec_id).map_err(status)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.tasks.delete(&req.id, &req.exec_id).map_err(status)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: timestamp(&exit),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.tasks.pids(&req.id).map_err(status)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.tasks.pause(&req.id).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.tasks.resume(&req.id).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(TaskError::Checkpoint))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.tasks
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.tasks
            .exec(&req.id, &req.exec_id, any_json(&req.spec), paths)
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let process = self.tasks.process(&req.id, &req.exec_id).map_err(status)?;
        let io = process.io.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(master) = &io.pty {
            crate::tty::resize(master, req.width, req.height).map_err(|e| status(e.into()))?;
        }
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let process = self.tasks.process(&req.id, &req.exec_id).map_err(status)?;
        if req.stdin {
            process
                .io
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.tasks
            .update(&req.id, &any_json(&req.resources))
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = self.tasks.process(&req.id, &req.exec_id).map_err(status)?;
        let exit = process.wait();
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: timestamp(&exit),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.tasks.stats(&req.id).map_err(status)?;
        let metrics = crate::metrics::from_stats(&stats);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, e.to_string()))
        })?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .tasks
            .process(&req.id, "")
            .ok()
            .and_then(|p| p.pid())
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // One shim serves a whole pod: it stays while any of its containers does.
        if self.tasks.is_empty() {
            self.tasks.cleanup();
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
