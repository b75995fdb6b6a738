//! OCI hooks of a container that runs in a VM. The runtime-namespace hooks (`prestart`,
//! `createRuntime`, `poststart`, `poststop`) name host programs, such as the
//! `libnetwork-setkey` hook dockerd adds to every container, which do not exist in the
//! guest: husk runs them on the host, as runc would, with the container's state on their
//! stdin, and keeps them out of the spec the guest gets. `createContainer` and
//! `startContainer` hooks run in the container, so they go to the guest.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks, Spec};

use crate::oci::state::OCI_VERSION;
use crate::oci::{Bundle, Entry, OciState, Status};

/// Errors running a hook.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HookError {
    /// the {stage} hook {path} could not be started: {source}
    Spawn {
        stage: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// the {stage} hook {path} failed ({status}): fix or remove it in config.json's hooks
    Failed {
        stage: &'static str,
        path: String,
        status: String,
    },
    /// the {stage} hook {path} did not finish within its timeout of {seconds} s
    Timeout {
        stage: &'static str,
        path: String,
        seconds: i64,
    },
}

/// The spec as a guest gets it: without the hooks that run on the host.
pub fn keep_guest_hooks(spec: &mut Spec) {
    let Some(hooks) = spec.hooks().clone() else {
        return;
    };
    let mut guest = Hooks::default();
    guest.set_create_container(hooks.create_container().clone());
    guest.set_start_container(hooks.start_container().clone());
    let empty = guest.create_container().is_none() && guest.start_container().is_none();
    spec.set_hooks((!empty).then_some(guest));
}

/// The host-side hook stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `prestart` and `createRuntime`: after the container exists, before `create` returns.
    Created,
    /// `poststart`: after `start`.
    Started,
    /// `poststop`: after the container is deleted.
    Deleted,
}

/// The hooks of `spec` for `stage`, in the order the runtime spec gives.
fn hooks_of(spec: &Spec, stage: Stage) -> Vec<(&'static str, Hook)> {
    let Some(hooks) = spec.hooks() else {
        return Vec::new();
    };
    let named = |name: &'static str, list: &Option<Vec<Hook>>| {
        list.clone()
            .unwrap_or_default()
            .into_iter()
            .map(move |h| (name, h))
    };
    match stage {
        #[allow(deprecated)]
        Stage::Created => named("prestart", hooks.prestart())
            .chain(named("createRuntime", hooks.create_runtime()))
            .collect(),
        Stage::Started => named("poststart", hooks.poststart()).collect(),
        Stage::Deleted => named("poststop", hooks.poststop()).collect(),
    }
}

/// Runs the hooks of `stage` with `state` on their stdin. `Created` stops at the first
/// failure (the container must then not be created); the others log and go on, as the
/// runtime spec asks.
pub fn run(spec: &Spec, stage: Stage, state: &OciState) -> Result<(), HookError> {
    let json = serde_json::to_vec(state).expect("the OCI state serializes");
    for (name, hook) in hooks_of(spec, stage) {
        match run_one(name, &hook, &json) {
            Ok(()) => {}
            Err(e) if stage == Stage::Created => return Err(e),
            Err(e) => log::warn!("container {}: {e}", state.id),
        }
    }
    Ok(())
}

/// Runs the hooks of `stage` for the container in `entry` (its bundle's spec, unless
/// given), its state showing `status` and `pid`. A bundle that is gone has no hooks left
/// to run.
pub fn run_for(
    entry: &Entry,
    spec: Option<&Spec>,
    stage: Stage,
    status: Status,
    pid: i32,
) -> Result<(), HookError> {
    let Ok(record) = entry.read() else {
        return Ok(());
    };
    let loaded;
    let spec = match spec {
        Some(spec) => spec,
        None => match Bundle::load(&record.bundle) {
            Ok(bundle) => {
                loaded = bundle.spec;
                &loaded
            }
            Err(_) => return Ok(()),
        },
    };
    let state = OciState {
        oci_version: OCI_VERSION.to_string(),
        id: record.id,
        status,
        pid,
        bundle: record.bundle,
        rootfs: record.rootfs,
        created: record.created,
        owner: String::new(),
        annotations: record.annotations,
    };
    run(spec, stage, &state)
}

fn run_one(stage: &'static str, hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let args = hook.args().clone().unwrap_or_default();
    let mut command = Command::new(hook.path());
    if let Some((arg0, rest)) = args.split_first() {
        command.arg0(arg0).args(rest);
    }
    command.env_clear();
    for pair in hook.env().clone().unwrap_or_default() {
        if let Some((k, v)) = pair.split_once('=') {
            command.env(k, v);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| HookError::Spawn {
            stage,
            path: path.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state is fine.
        let _ = stdin.write_all(state);
    }
    let deadline = hook
        .timeout()
        .map(|s| Instant::now() + Duration::from_secs(s.max(1) as u64));
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            if status.success() {
                return Ok(());
            }
            return Err(HookError::Failed {
                stage,
                path,
                status: status.to_string(),
            });
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout {
                stage,
                path,
                seconds: hook.timeout().unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{HookBuilder, HooksBuilder, SpecBuilder};

    use super::*;
    use crate::oci::Status;

    fn hook(script: &str) -> Hook {
        HookBuilder::default()
            .path("/bin/sh")
            .args(vec!["sh".to_string(), "-c".to_string(), script.to_string()])
            .build()
            .unwrap()
    }

    fn state() -> OciState {
        OciState {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: Status::Created,
            pid: 42,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: String::new(),
            owner: String::new(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn host_hooks_run_with_the_state_and_stay_out_of_the_guest_spec() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let o = out.display();
        let mut spec = SpecBuilder::default()
            .hooks(
                HooksBuilder::default()
                    .create_runtime(vec![hook(&format!("cat > {o}"))])
                    .poststart(vec![hook("exit 3"), hook(&format!("echo started >> {o}"))])
                    .start_container(vec![hook("true")])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        run(&spec, Stage::Created, &state()).unwrap();
        let seen: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(
            (seen["id"].as_str(), seen["pid"].as_i64()),
            (Some("c1"), Some(42))
        );
        // A failing poststart hook is logged; the next one still runs.
        run(&spec, Stage::Started, &state()).unwrap();
        assert!(std::fs::read_to_string(&out)
            .unwrap()
            .ends_with("started\n"));
        keep_guest_hooks(&mut spec);
        let hooks = spec.hooks().clone().unwrap();
        assert!(hooks.create_runtime().is_none() && hooks.poststart().is_none());
        assert_eq!(hooks.start_container().as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn a_failing_create_hook_fails_create_and_names_the_hook() {
        let spec = SpecBuilder::default()
            .hooks(
                HooksBuilder::default()
                    .create_runtime(vec![hook("exit 2")])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let err = run(&spec, Stage::Created, &state())
            .unwrap_err()
            .to_string();
        assert!(err.contains("createRuntime hook /bin/sh failed"), "{err}");
        let mut missing = hook("true");
        missing.set_path("/nonexistent/hook".into());
        let spec = SpecBuilder::default()
            .hooks(
                HooksBuilder::default()
                    .create_runtime(vec![missing])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let err = run(&spec, Stage::Created, &state())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/hook could not be started"),
            "{err}"
        );
    }
}
