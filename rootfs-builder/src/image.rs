//! An OCI image layout tarball of the busybox rootfs, loadable by `ctr image import`
//! (which reads `index.json`) and by Docker 20.10's `docker load` (which reads only
//! Docker's `manifest.json`, so that is written too, pointing at the same blobs).
//!
//! Everything is deterministic: tar entries with mtime 0 and uid/gid 0, JSON with
//! sorted keys, no creation time in the config. One uncompressed layer, so its digest
//! is also its diff_id.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder, ANNOTATION_REF_NAME,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::busybox::BusyboxError;
use crate::tree::{Kind, Tree, TreeError};

/// The name `husk-rootfs image` gives when `--name` is not set.
pub const DEFAULT_NAME: &str = "docker.io/library/husk-busybox:latest";

/// The annotation containerd's importer takes the image name from.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The command the image runs when none is given.
const DEFAULT_CMD: &str = "sh";
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors building the image. Messages come from the doc comments.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ImageError {
    /// image name `{name}` is not valid: {reason} (expected e.g. `docker.io/library/husk-busybox:latest`)
    BadName { name: String, reason: &'static str },
    /// {0}
    Busybox(#[from] BusyboxError),
    /// {0}
    Tree(#[from] TreeError),
    /// building image metadata failed: {0}
    Spec(#[from] oci_spec::OciSpecError),
    /// writing the image tarball failed: {0}
    Io(#[from] io::Error),
}

/// An image name split into the repository and tag, as both file formats want them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// `docker.io/library/husk-busybox`
    pub repository: String,
    /// `latest`
    pub tag: String,
}

impl ImageName {
    pub fn full(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

impl std::str::FromStr for ImageName {
    type Err = ImageError;

    /// Accepts `REPOSITORY[:TAG]`; the tag defaults to `latest`, as in Docker.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ImageError::BadName {
            name: name.to_string(),
            reason,
        };
        if name.contains('@') {
            return Err(bad("digest references cannot name a new image"));
        }
        // A colon after the last slash starts the tag; one before it is a registry port.
        let last_part = name.rsplit('/').next().unwrap_or(name);
        let (repository, tag) = match last_part.rfind(':') {
            Some(i) => {
                let split = name.len() - last_part.len() + i;
                (&name[..split], &name[split + 1..])
            }
            None => (name, "latest"),
        };
        let repo_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c);
        if repository.is_empty() || repository.ends_with('/') || repository.starts_with('/') {
            return Err(bad("the repository part is empty"));
        }
        if !repository.chars().all(repo_ok) {
            return Err(bad(
                "repositories use lowercase letters, digits, `.`, `_`, `-` and `/`",
            ));
        }
        let tag_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if tag.is_empty()
            || tag.len() > 128
            || tag.starts_with(['.', '-'])
            || !tag.chars().all(tag_ok)
        {
            return Err(bad(
                "tags are 1-128 of letters, digits, `.`, `_`, `-`, not starting with `.` or `-`",
            ));
        }
        Ok(ImageName {
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }
}

/// One content-addressed blob.
struct Blob {
    hex: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Blob {
            hex: format!("{:x}", Sha256::digest(&bytes)),
            bytes,
        }
    }

    fn digest(&self) -> Result<Digest, ImageError> {
        Ok(format!("sha256:{}", self.hex).parse()?)
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor, ImageError> {
        Ok(Descriptor::new(
            media_type,
            self.bytes.len() as u64,
            self.digest()?,
        ))
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.hex)
    }
}

/// Writes `tree` as a one-layer image named `name` in OCI layout tar form.
pub fn write_image<W: Write>(tree: &Tree, name: &ImageName, out: W) -> Result<W, ImageError> {
    let layer = Blob::new(layer_tar(tree)?);
    let config = Blob::new(canonical_json(&image_config(&layer)?)?);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor(MediaType::ImageConfig)?)
        .layers(vec![layer.descriptor(MediaType::ImageLayer)?])
        .build()?;
    let manifest = Blob::new(canonical_json(&manifest)?);

    let annotations = HashMap::from([
        (ANNOTATION_CONTAINERD_NAME.to_string(), name.full()),
        (ANNOTATION_REF_NAME.to_string(), name.tag.clone()),
    ]);
    let platform = PlatformBuilder::default()
        .architecture(Arch::default())
        .os(Os::default())
        .build()?;
    let manifest_descriptor = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(manifest.digest()?)
        .size(manifest.bytes.len() as u64)
        .annotations(annotations)
        .platform(platform)
        .build()?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_descriptor])
        .build()?;
    let oci_layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    // Docker's own archive format; its loader ignores index.json.
    let docker_manifest = serde_json::json!([{
        "Config": config.path(),
        "RepoTags": [name.full()],
        "Layers": [layer.path()],
    }]);
    // Only pre-1.10 Docker reads `repositories`; newer ones take tags from manifest.json.
    // `docker save` writes it too, mapping the repository's tag to the image.
    let repositories = serde_json::json!({ &name.repository: { &name.tag: &config.hex } });

    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), canonical_json(&oci_layout)?),
        ("index.json".into(), canonical_json(&index)?),
        ("manifest.json".into(), canonical_json(&docker_manifest)?),
        ("repositories".into(), canonical_json(&repositories)?),
    ];
    for blob in [layer, config, manifest] {
        files.push((blob.path(), blob.bytes));
    }
    files.sort();

    let mut archive = tar::Builder::new(out);
    for dir in ["blobs", "blobs/sha256"] {
        append(
            &mut archive,
            &format!("{dir}/"),
            tar::EntryType::Directory,
            0o755,
            &[],
        )?;
    }
    for (path, bytes) in &files {
        append(&mut archive, path, tar::EntryType::Regular, 0o644, bytes)?;
    }
    Ok(archive.into_inner()?)
}

fn image_config(layer: &Blob) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(vec![layer.digest()?.to_string()])
        .build()?;
    let config = ConfigBuilder::default()
        .env(vec![DEFAULT_PATH_ENV.to_string()])
        .cmd(vec![DEFAULT_CMD.to_string()])
        .build()?;
    Ok(ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::default())
        .rootfs(rootfs)
        .config(config)
        .build()?)
}

/// The layer: every node of `tree`, parents first, owned by root, mtime 0.
pub fn layer_tar(tree: &Tree) -> Result<Vec<u8>, ImageError> {
    let mut archive = tar::Builder::new(Vec::new());
    for (path, node) in tree.iter() {
        let name = path.to_str().ok_or_else(|| TreeError::BadGuestPath {
            path: path.display().to_string(),
            reason: "tar names must be UTF-8 here",
        })?;
        match &node.kind {
            Kind::Dir => append(
                &mut archive,
                &format!("{name}/"),
                tar::EntryType::Directory,
                node.mode,
                &[],
            )?,
            Kind::File(content) => {
                // Read whole files: the tar header needs the exact size up front, and a
                // file changing while read must not produce a corrupt archive.
                let (mut reader, _) = content.open()?;
                let mut bytes = Vec::new();
                reader.read_to_end(&mut bytes)?;
                append(
                    &mut archive,
                    name,
                    tar::EntryType::Regular,
                    node.mode,
                    &bytes,
                )?;
            }
            Kind::Symlink(target) => {
                let mut header = header(tar::EntryType::Symlink, node.mode, 0);
                archive.append_link(&mut header, name, target)?;
            }
            Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                let entry_type = if matches!(node.kind, Kind::CharDevice { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut header = header(entry_type, node.mode, 0);
                header.set_device_major(*major)?;
                header.set_device_minor(*minor)?;
                archive.append_data(&mut header, name, io::empty())?;
            }
        }
    }
    Ok(archive.into_inner()?)
}

fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

fn append<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    entry_type: tar::EntryType,
    mode: u32,
    bytes: &[u8],
) -> io::Result<()> {
    let mut header = header(entry_type, mode, bytes.len() as u64);
    archive.append_data(&mut header, path, bytes)
}

/// JSON with object keys sorted, so maps (`HashMap` annotations) serialize the same way
/// every run and blob digests are stable.
fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    fn sort(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    let value = serde_json::to_value(value).map_err(io::Error::from)?;
    Ok(serde_json::to_vec(&sort(value)).map_err(io::Error::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<ImageName, ImageError> {
        s.parse()
    }

    #[test]
    fn names_split_into_repository_and_tag() {
        let n = name(DEFAULT_NAME).unwrap();
        assert_eq!(
            (n.repository.as_str(), n.tag.as_str()),
            ("docker.io/library/husk-busybox", "latest")
        );
        let n = name("localhost:5000/demo").unwrap();
        assert_eq!(
            (n.repository.as_str(), n.tag.as_str()),
            ("localhost:5000/demo", "latest")
        );
        assert_eq!(name("demo:v1.2").unwrap().full(), "demo:v1.2");
    }

    #[test]
    fn bad_names_are_refused_with_the_name() {
        for bad in [
            "",
            "Upper/case",
            "demo:",
            "demo:-x",
            "demo@sha256:00",
            "/demo",
            "a b",
        ] {
            let err = name(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = serde_json::json!({"b": 1, "a": {"d": 2, "c": [{"f": 3, "e": 4}]}});
        let text = String::from_utf8(canonical_json(&value).unwrap()).unwrap();
        assert_eq!(text, r#"{"a":{"c":[{"e":4,"f":3}],"d":2},"b":1}"#);
    }

    #[test]
    fn layer_keeps_modes_links_and_devices() {
        let mut tree = Tree::new();
        tree.add_bytes("/bin/busybox", 0o755, b"elf").unwrap();
        tree.add_symlink("/bin/sh", "/bin/busybox").unwrap();
        tree.add_char_device("/dev/null", 0o666, 1, 3).unwrap();
        let layer = layer_tar(&tree).unwrap();
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(
                (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
                (0, 0, 0)
            );
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            let dev = (h.entry_type() == tar::EntryType::Char).then(|| {
                (
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                )
            });
            let path = entry.path().unwrap().display().to_string();
            seen.push((path, h.entry_type(), h.mode().unwrap(), link, dev));
        }
        use tar::EntryType as T;
        let expected = vec![
            ("bin/".to_string(), T::Directory, 0o755, None, None),
            ("bin/busybox".into(), T::Regular, 0o755, None, None),
            (
                "bin/sh".into(),
                T::Symlink,
                0o777,
                Some("/bin/busybox".into()),
                None,
            ),
            ("dev/".into(), T::Directory, 0o755, None, None),
            ("dev/null".into(), T::Char, 0o666, None, Some((1, 3))),
        ];
        assert_eq!(seen, expected);
    }
}
