//! The isolation level of a container: a microVM or a plain namespaced container.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The annotation that selects the isolation level per container.
pub const ANNOTATION: &str = "io.husk.isolation";

/// How a container is isolated from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// One KVM microVM per container (the default).
    Vm,
    /// Namespaces, cgroups and seccomp on the host kernel (libcontainer).
    Container,
}

/// Errors choosing the isolation level.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum IsolationError {
    /// unknown isolation {0:?}: use "vm" or "container"
    Unknown(String),
    /// config.json `annotations["io.husk.isolation"]`: unknown isolation {0:?}: use "vm" or "container"
    BadAnnotation(String),
}

impl FromStr for Isolation {
    type Err = IsolationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vm" => Ok(Isolation::Vm),
            "container" => Ok(Isolation::Container),
            other => Err(IsolationError::Unknown(other.to_string())),
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Vm => "vm",
            Isolation::Container => "container",
        })
    }
}

impl Isolation {
    /// The bundle's annotation wins over the command-line flag, which wins over the default.
    pub fn choose(
        flag: Option<Isolation>,
        annotations: Option<&HashMap<String, String>>,
    ) -> Result<Isolation, IsolationError> {
        if let Some(value) = annotations.and_then(|a| a.get(ANNOTATION)) {
            return value
                .parse()
                .map_err(|_| IsolationError::BadAnnotation(value.clone()));
        }
        Ok(flag.unwrap_or(Isolation::Vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_beats_flag_beats_default() {
        let mut ann = HashMap::new();
        assert_eq!(Isolation::choose(None, None), Ok(Isolation::Vm));
        assert_eq!(
            Isolation::choose(Some(Isolation::Container), Some(&ann)),
            Ok(Isolation::Container)
        );
        ann.insert(ANNOTATION.to_string(), "vm".to_string());
        assert_eq!(
            Isolation::choose(Some(Isolation::Container), Some(&ann)),
            Ok(Isolation::Vm)
        );
        ann.insert(ANNOTATION.to_string(), "kvm".to_string());
        let err = Isolation::choose(None, Some(&ann)).unwrap_err().to_string();
        assert!(
            err.contains("io.husk.isolation") && err.contains("kvm"),
            "{err}"
        );
        assert!("bogus".parse::<Isolation>().is_err());
    }
}
