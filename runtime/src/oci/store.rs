//! The state store: one directory per container under `--root`, holding `husk.json`
//! (written atomically: temp file, fsync, rename) and a `lock` file that every command
//! takes with `flock` before it reads or changes the container.
//!
//! ```text
//! <root>/<id>/lock        flock'ed by each command for its duration
//! <root>/<id>/husk.json   the Record
//! <root>/<id>/...         backend files (libcontainer's state, sockets)
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::id::{self, IdError};
use super::isolation::Isolation;

const RECORD: &str = "husk.json";
const LOCK: &str = "lock";

/// What husk remembers about a container, whatever its backend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub id: String,
    pub isolation: Isolation,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339.
    pub created: String,
    pub annotations: HashMap<String, String>,
    /// The pid `create` reported (container init, or the vmm daemon); None while creating.
    pub pid: Option<i32>,
    /// A pod member that runs in its pod's sandbox (the sandbox container's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_sandbox: Option<String>,
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StoreError {
    /// {0}
    Id(#[from] IdError),
    /// container "{0}" does not exist: see `husk list` for the containers under this --root
    NotFound(String),
    /// container "{0}" already exists: pick another id, or `husk delete {0}` first
    Exists(String),
    /// cannot use state directory {path}: {source}
    Io { path: PathBuf, source: io::Error },
    /// cannot lock {path}: {source}
    Lock { path: PathBuf, source: nix::Error },
    /// state file {path} is corrupt ({source}): `husk delete --force` the container
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory that holds all containers (`--root`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// One container's directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct Entry {
    id: String,
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (and creates, mode 0700) the root directory.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err(root))?;
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Claims a new id: creates its directory (atomically: a second claim fails) and locks it.
    pub fn reserve(&self, id: &str) -> Result<Entry, StoreError> {
        id::validate(id)?;
        let dir = self.root.join(id);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(id.to_string()))
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        match lock(&dir) {
            Ok(lock) => Ok(Entry {
                id: id.to_string(),
                dir,
                _lock: lock,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Locks an existing container, waiting for other commands on it to finish.
    pub fn lock(&self, id: &str) -> Result<Entry, StoreError> {
        id::validate(id)?;
        let dir = self.root.join(id);
        if !dir.join(RECORD).exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let lock = lock(&dir).map_err(|e| match e {
            StoreError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound => {
                StoreError::NotFound(id.to_string())
            }
            e => e,
        })?;
        // Deleted while we waited for the lock.
        if !dir.join(RECORD).exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(Entry {
            id: id.to_string(),
            dir,
            _lock: lock,
        })
    }

    /// The ids of all containers with a record, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if id::validate(&name).is_ok() && entry.path().join(RECORD).exists() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

fn lock(dir: &Path) -> Result<Flock<File>, StoreError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err(&path))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, source)| StoreError::Lock { path, source })
}

impl Entry {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's directory, where backends keep their files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the record.
    pub fn read(&self) -> Result<Record, StoreError> {
        let path = self.dir.join(RECORD);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(self.id.clone()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&text).map_err(|source| StoreError::Corrupt { path, source })
    }

    /// Writes the record atomically.
    pub fn write(&self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Corrupt {
            path: self.dir.join(RECORD),
            source,
        })?;
        write_atomic(&self.dir.join(RECORD), &json)
    }

    /// Removes the container's directory (the lock goes with it).
    pub fn remove(self) -> Result<(), StoreError> {
        // Drop the record first, so a command that waits on the lock sees "not found".
        let _ = fs::remove_file(self.dir.join(RECORD));
        fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))
    }
}

/// Writes `data` to `path` through a temp file in the same directory and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            isolation: Isolation::Container,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2024-01-01T00:00:00Z".into(),
            annotations: HashMap::new(),
            pid: Some(7),
            pod_sandbox: None,
        }
    }

    #[test]
    fn reserve_write_read_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("root")).unwrap();
        let e = store.reserve("c1").unwrap();
        // Reserved but not written yet: not listed, not found.
        assert!(store.list().unwrap().is_empty());
        e.write(&record("c1")).unwrap();
        assert_eq!(e.read().unwrap(), record("c1"));
        drop(e);
        assert_eq!(store.list().unwrap(), vec!["c1".to_string()]);
        let err = store.reserve("c1").unwrap_err().to_string();
        assert!(err.contains("\"c1\" already exists"), "{err}");
        let e = store.lock("c1").unwrap();
        e.remove().unwrap();
        assert!(!tmp.path().join("root/c1").exists());
        let err = store.lock("c1").unwrap_err().to_string();
        assert!(err.contains("\"c1\" does not exist"), "{err}");
        assert!(matches!(store.reserve("../x"), Err(StoreError::Id(_))));
        assert!(matches!(store.lock("a/b"), Err(StoreError::Id(_))));
    }

    #[test]
    fn lock_excludes_a_second_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let e = store.reserve("c").unwrap();
        e.write(&record("c")).unwrap();
        let file = File::open(tmp.path().join("c").join(LOCK)).unwrap();
        let busy = Flock::lock(file, FlockArg::LockExclusiveNonblock);
        assert!(busy.is_err(), "a held entry must block others");
        drop(e);
        let file = File::open(tmp.path().join("c").join(LOCK)).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }

    #[test]
    fn corrupt_record_is_reported_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let e = store.reserve("c").unwrap();
        fs::write(tmp.path().join("c").join(RECORD), b"{").unwrap();
        let err = e.read().unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("delete --force"),
            "{err}"
        );
        write_atomic(&tmp.path().join("c").join(RECORD), b"{}").unwrap();
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
