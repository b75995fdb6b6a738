//! Checks on the JSON allowlists that seccompiler does not make: every rule and every
//! argument condition says why it is there, the thread's filter is the only one in its
//! file, and the default action is to kill the process. Shared with `build.rs` (through
//! `#[path]`), so a filter that breaks a rule fails the build, not a run.

use serde_json::Value;

/// Errors in a seccomp JSON file.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PolicyError {
    /// {file}: not valid JSON: {message}
    Json { file: String, message: String },
    /// {file}: must hold exactly one filter, named `{thread}` (one file per thread kind)
    Shape { file: String, thread: String },
    /// {file}: `default_action` must be "kill_process" (the log mode is derived at build time), not {found}
    DefaultAction { file: String, found: String },
    /// {file}: `filter_action` must be "allow", not {found}
    FilterAction { file: String, found: String },
    /// {file}: rule {index} ({syscall}) has no "comment"; say why the thread needs it
    RuleComment {
        file: String,
        index: usize,
        syscall: String,
    },
    /// {file}: rule {index} ({syscall}) has an argument condition without a "comment" naming the constant
    ArgComment {
        file: String,
        index: usize,
        syscall: String,
    },
}

/// What a checked filter allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySummary {
    /// Number of rules (a syscall with several argument alternatives counts once per rule).
    pub rules: usize,
    /// Distinct syscalls reachable, sorted.
    pub syscalls: Vec<String>,
}

fn non_empty_str(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty())
}

/// Checks `text` (the file `file`) holds exactly the filter `thread` with commented rules.
pub fn check(file: &str, thread: &str, text: &str) -> Result<PolicySummary, PolicyError> {
    let root: Value = serde_json::from_str(text).map_err(|e| PolicyError::Json {
        file: file.into(),
        message: e.to_string(),
    })?;
    let shape = || PolicyError::Shape {
        file: file.into(),
        thread: thread.into(),
    };
    let map = root.as_object().ok_or_else(shape)?;
    if map.len() != 1 {
        return Err(shape());
    }
    let filter = map
        .get(thread)
        .and_then(Value::as_object)
        .ok_or_else(shape)?;
    let action = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| filter.get(*n))
            .map(|v| v.to_string())
            .unwrap_or_else(|| "nothing".into())
    };
    let default = action(["default_action", "mismatch_action"]);
    if default != "\"kill_process\"" {
        return Err(PolicyError::DefaultAction {
            file: file.into(),
            found: default,
        });
    }
    let on_match = action(["filter_action", "match_action"]);
    if on_match != "\"allow\"" {
        return Err(PolicyError::FilterAction {
            file: file.into(),
            found: on_match,
        });
    }
    let rules = filter
        .get("filter")
        .and_then(Value::as_array)
        .ok_or_else(shape)?;
    let mut syscalls = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let syscall = rule
            .get("syscall")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if !non_empty_str(rule.get("comment")) {
            return Err(PolicyError::RuleComment {
                file: file.into(),
                index,
                syscall,
            });
        }
        let args = rule.get("args").and_then(Value::as_array);
        if args.is_some_and(|args| args.iter().any(|a| !non_empty_str(a.get("comment")))) {
            return Err(PolicyError::ArgComment {
                file: file.into(),
                index,
                syscall,
            });
        }
        syscalls.push(syscall);
    }
    syscalls.sort();
    syscalls.dedup();
    Ok(PolicySummary {
        rules: rules.len(),
        syscalls,
    })
}

/// The same filter with its default action turned into "log" (the `--seccomp log` mode):
/// calls outside the list are allowed and written to the kernel's audit log.
pub fn with_log_default(thread: &str, text: &str) -> Result<String, PolicyError> {
    let mut root: Value = serde_json::from_str(text).map_err(|e| PolicyError::Json {
        file: thread.into(),
        message: e.to_string(),
    })?;
    let filter = root
        .get_mut(thread)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| PolicyError::Shape {
            file: thread.into(),
            thread: thread.into(),
        })?;
    filter.remove("mismatch_action");
    filter.insert("default_action".into(), Value::String("log".into()));
    Ok(root.to_string())
}
