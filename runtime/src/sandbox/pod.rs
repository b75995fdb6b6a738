//! Pods: containerd's CRI plugin marks each container of a pod with annotations. The
//! pod's sandbox container owns the sandbox (with `--isolation vm`: the VM); the pod's
//! other containers ("members") run in it: in its VM, as guest containers that join the
//! sandbox container's namespaces ([`super::member`]). The shim serves a whole pod from
//! one instance (the sandbox id picks its socket).

use std::collections::HashMap;
use std::path::Path;

/// CRI annotation: `sandbox` for the pod's sandbox container, `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the id of the pod's sandbox container.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// A container's place in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not part of a pod: a sandbox of its own.
    Alone,
    /// The pod's sandbox container: the sandbox itself.
    Sandbox,
    /// A container of the pod whose sandbox container is `sandbox_id`.
    Member { sandbox_id: String },
}

impl Role {
    pub fn of(id: &str, annotations: &HashMap<String, String>) -> Role {
        match (
            annotations.get(CONTAINER_TYPE).map(String::as_str),
            annotations.get(SANDBOX_ID),
        ) {
            (Some("sandbox"), _) => Role::Sandbox,
            (Some("container"), Some(sandbox)) if sandbox != id => Role::Member {
                sandbox_id: sandbox.clone(),
            },
            _ => Role::Alone,
        }
    }

    /// The key that picks the shim instance (its socket): one per pod.
    pub fn grouping(&self, id: &str) -> String {
        match self {
            Role::Member { sandbox_id } => sandbox_id.clone(),
            Role::Alone | Role::Sandbox => id.to_string(),
        }
    }
}

/// The annotations of the bundle's config.json; none when it cannot be read (the
/// container is then its own pod, and create reports the bad bundle).
pub fn annotations(bundle: &Path) -> HashMap<String, String> {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value(v.get("annotations")?.clone()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_annotations_group_a_pod() {
        let sandbox = HashMap::from([
            (CONTAINER_TYPE.to_string(), "sandbox".to_string()),
            (SANDBOX_ID.to_string(), "pod1".to_string()),
        ]);
        let member = HashMap::from([
            (CONTAINER_TYPE.to_string(), "container".to_string()),
            (SANDBOX_ID.to_string(), "pod1".to_string()),
        ]);
        assert_eq!(Role::of("pod1", &sandbox), Role::Sandbox);
        assert_eq!(Role::of("pod1", &sandbox).grouping("pod1"), "pod1");
        let role = Role::of("app", &member);
        assert_eq!(role.grouping("app"), "pod1");
        assert_eq!(Role::of("solo", &HashMap::new()), Role::Alone);
        assert_eq!(Role::of("solo", &HashMap::new()).grouping("solo"), "solo");
    }
}
