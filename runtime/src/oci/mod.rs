//! OCI bundles and the per-container state store under `--root`.

pub mod bundle;
pub mod id;
pub mod isolation;
pub mod state;
pub mod store;

pub use bundle::{Bundle, BundleError};
pub use isolation::{Isolation, IsolationError};
pub use state::{OciState, Status};
pub use store::{Entry, Record, Store, StoreError};
