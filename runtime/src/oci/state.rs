//! The OCI state document printed by `husk state`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

/// The OCI runtime spec version husk implements.
pub const OCI_VERSION: &str = "1.2.0";

/// A container's lifecycle status, as the OCI runtime spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// The OCI state of a container, with runc's extra fields (`rootfs`, `created`, `owner`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// The container's pid; 0 once it has stopped, as runc reports it.
    pub pid: i32,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    pub owner: String,
    pub annotations: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_oci_field_names() {
        let s = OciState {
            oci_version: OCI_VERSION.into(),
            id: "c1".into(),
            status: Status::Created,
            pid: 42,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2024-01-01T00:00:00Z".into(),
            owner: String::new(),
            annotations: HashMap::from([("k".into(), "v".into())]),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ociVersion"], OCI_VERSION);
        assert_eq!(v["status"], "created");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["annotations"]["k"], "v");
        assert_eq!(serde_json::from_value::<OciState>(v).unwrap(), s);
    }
}
