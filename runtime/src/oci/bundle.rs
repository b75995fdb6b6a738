//! Loading an OCI bundle: `config.json` parsed with the JSON path of any fault, and the
//! checks every isolation level needs before anything is created.

use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Sections of config.json for other platforms, which husk cannot honour.
const FOREIGN_SECTIONS: &[&str] = &["solaris", "windows", "vm", "zos"];

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub path: PathBuf,
    /// The parsed config.json.
    pub spec: Spec,
}

/// Errors loading a bundle.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BundleError {
    /// bundle {path} is not a directory ({source}): pass an OCI bundle directory with --bundle
    NotADirectory { path: PathBuf, source: io::Error },
    /// {path} does not exist: a bundle needs a config.json (`husk spec` writes one)
    MissingConfig { path: PathBuf },
    /// cannot read {path}: {source}
    Read { path: PathBuf, source: io::Error },
    /// {path}: invalid value at `{json_path}`: {message}; fix that field of config.json
    Invalid {
        path: PathBuf,
        json_path: String,
        message: String,
    },
    /// {path}: `{json_path}` is not supported by husk ({why}); remove it from config.json
    Unsupported {
        path: PathBuf,
        json_path: String,
        why: &'static str,
    },
}

impl Bundle {
    /// Loads `dir/config.json` and checks the fields every isolation level relies on.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = std::fs::canonicalize(dir)
            .and_then(|p| {
                if p.is_dir() {
                    Ok(p)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        "not a directory",
                    ))
                }
            })
            .map_err(|source| BundleError::NotADirectory {
                path: dir.to_path_buf(),
                source,
            })?;
        let config = path.join("config.json");
        let text = match std::fs::read_to_string(&config) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::MissingConfig { path: config })
            }
            Err(source) => {
                return Err(BundleError::Read {
                    path: config,
                    source,
                })
            }
        };
        let spec = parse(&config, &text)?;
        check(&config, &path, &spec)?;
        Ok(Bundle { path, spec })
    }

    /// The root filesystem, resolved against the bundle directory.
    pub fn rootfs(&self) -> PathBuf {
        let root = self
            .spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        self.path.join(root)
    }
}

/// Parses config.json text, naming the JSON path at fault.
pub fn parse(config: &Path, text: &str) -> Result<Spec, BundleError> {
    let invalid = |json_path: String, message: String| BundleError::Invalid {
        path: config.to_path_buf(),
        json_path,
        message,
    };
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(".".to_string(), e.to_string()))?;
    if let Some(obj) = raw.as_object() {
        if let Some(key) = FOREIGN_SECTIONS.iter().find(|k| obj.contains_key(**k)) {
            return Err(BundleError::Unsupported {
                path: config.to_path_buf(),
                json_path: (*key).to_string(),
                why: "husk runs Linux containers only",
            });
        }
    } else {
        return Err(invalid(
            ".".to_string(),
            "config.json must be a JSON object".to_string(),
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Spec>(&mut de).map_err(|e| {
        let json_path = e.path().to_string();
        invalid(json_path, e.into_inner().to_string())
    })
}

/// Checks the fields that would otherwise fail late, inside the container.
fn check(config: &Path, bundle: &Path, spec: &Spec) -> Result<(), BundleError> {
    let invalid = |json_path: &str, message: String| BundleError::Invalid {
        path: config.to_path_buf(),
        json_path: json_path.to_string(),
        message,
    };
    if !spec.version().starts_with("1.") {
        return Err(invalid(
            "ociVersion",
            format!(
                "version {:?} is not supported: husk runs 1.x specs",
                spec.version()
            ),
        ));
    }
    let root = spec.root().as_ref().ok_or_else(|| {
        invalid(
            "root",
            "missing: the bundle must name its root filesystem".into(),
        )
    })?;
    let rootfs = bundle.join(root.path());
    if !rootfs.is_dir() {
        return Err(invalid(
            "root.path",
            format!("{} is not a directory", rootfs.display()),
        ));
    }
    let process = spec.process().as_ref().ok_or_else(|| {
        invalid(
            "process",
            "missing: the container needs a process to run".into(),
        )
    })?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid(
            "process.args",
            "must name the program to run".into(),
        ));
    }
    if !process.cwd().is_absolute() {
        return Err(invalid(
            "process.cwd",
            format!("{} must be an absolute path", process.cwd().display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}}"#;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    fn err(config: &str) -> String {
        let dir = bundle_with(config);
        Bundle::load(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn loads_a_minimal_bundle() {
        let dir = bundle_with(MINIMAL);
        let b = Bundle::load(dir.path()).unwrap();
        assert!(b.path.is_absolute());
        assert_eq!(b.rootfs(), b.path.join("rootfs"));
    }

    #[test]
    fn names_the_json_path_of_a_wrong_type() {
        let e = err(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "process":{"cwd":"/","args":["sh"],"user":{"uid":"root","gid":0}}}"#);
        assert!(e.contains("`process.user.uid`"), "{e}");
        let e = err(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","args":["sh"],
            "user":{"uid":0,"gid":0}},"mounts":[{"destination":"/x"},{"destination":7}]}"#,
        );
        assert!(e.contains("`mounts[1].destination`"), "{e}");
    }

    #[test]
    fn reports_syntax_errors_missing_parts_and_foreign_sections() {
        assert!(err("{not json").contains("line 1"));
        assert!(err(&MINIMAL.replace("\"rootfs\"", "\"nope\"")).contains("`root.path`"));
        assert!(err(&MINIMAL.replace("[\"sh\"]", "[]")).contains("`process.args`"));
        assert!(err(&MINIMAL.replace("\"cwd\":\"/\"", "\"cwd\":\"rel\"")).contains("`process.cwd`"));
        assert!(err(&MINIMAL.replace("1.0.2", "0.9.0")).contains("`ociVersion`"));
        let e = err(&MINIMAL.replace("{\"ociVersion\"", "{\"windows\":{},\"ociVersion\""));
        assert!(e.contains("`windows` is not supported"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.json does not exist") && e.contains("husk spec"),
            "{e}"
        );
        let e = Bundle::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--bundle"), "{e}");
    }
}
