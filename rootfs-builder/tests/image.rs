//! `husk-rootfs image`: every digest, size and cross-reference in the tarball verifies.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use common::{husk_rootfs, husk_rootfs_ok, stderr};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest, Sha256};

/// The regular files of a tarball, by path.
fn read_tar(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in tar::Archive::new(bytes).entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(path, data);
        }
    }
    files
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Returns the blob a descriptor points at, after checking its digest, size and path.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, d: &Descriptor) -> &'a [u8] {
    let digest = d.digest().to_string();
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .expect("blob for descriptor");
    assert_eq!(
        sha256(bytes),
        digest,
        "blob content does not match its digest"
    );
    assert_eq!(bytes.len() as u64, d.size(), "descriptor size of {digest}");
    bytes
}

fn build(dir: &Path, file: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(file);
    let mut args = vec!["image", "--out", out.to_str().unwrap()];
    args.extend(extra);
    husk_rootfs_ok(&args);
    fs::read(out).unwrap()
}

#[test]
fn index_manifest_config_and_layer_verify() {
    let dir = tempfile::tempdir().unwrap();
    let files = read_tar(&build(dir.path(), "image.tar", &[]));

    // Every blob is stored under its own digest.
    for (path, bytes) in files.iter().filter(|(p, _)| p.starts_with("blobs/")) {
        let hex = path
            .strip_prefix("blobs/sha256/")
            .expect("blobs only under sha256/");
        assert_eq!(sha256(bytes), format!("sha256:{hex}"), "{path}");
    }
    let layout: serde_json::Value = serde_json::from_slice(&files["oci-layout"]).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");

    let index: ImageIndex = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(index.manifests().len(), 1);
    let manifest_desc = &index.manifests()[0];
    assert_eq!(manifest_desc.media_type(), &MediaType::ImageManifest);
    let annotations = manifest_desc.annotations().clone().expect("annotations");
    assert_eq!(
        annotations["io.containerd.image.name"],
        "docker.io/library/husk-busybox:latest"
    );
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "latest");

    let manifest: ImageManifest = serde_json::from_slice(blob(&files, manifest_desc)).unwrap();
    assert_eq!(manifest.config().media_type(), &MediaType::ImageConfig);
    let config: ImageConfiguration =
        serde_json::from_slice(blob(&files, manifest.config())).unwrap();
    assert_eq!(manifest.layers().len(), 1);
    let layer_desc = &manifest.layers()[0];
    assert_eq!(
        layer_desc.media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar"
    );
    let layer = blob(&files, layer_desc);

    // Uncompressed layer: its diff_id is the digest of the bytes themselves.
    assert_eq!(config.rootfs().diff_ids(), &[sha256(layer)]);
    assert_eq!(config.rootfs().typ(), "layers");
    assert_eq!(config.architecture().to_string(), "amd64");
    assert_eq!(config.os().to_string(), "linux");
    let cmd = config.config().as_ref().and_then(|c| c.cmd().clone());
    assert_eq!(cmd.unwrap(), ["sh"]);

    // Docker's manifest.json points at the same blobs under the same name.
    let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let config_hex = manifest.config().digest().digest().to_string();
    let layer_hex = layer_desc.digest().digest().to_string();
    let expected = serde_json::json!([{
        "Config": format!("blobs/sha256/{config_hex}"),
        "RepoTags": ["docker.io/library/husk-busybox:latest"],
        "Layers": [format!("blobs/sha256/{layer_hex}")],
    }]);
    assert_eq!(docker, expected);
    let repositories: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
    assert!(repositories["docker.io/library/husk-busybox"]["latest"].is_string());

    // The layer is the busybox rootfs.
    let mut saw = (false, false);
    for entry in tar::Archive::new(layer).entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let h = entry.header();
        if path == "bin/busybox" {
            assert!(h.entry_type().is_file() && h.mode().unwrap() == 0o755);
            saw.0 = true;
        }
        if path == "bin/sh" {
            assert!(h.entry_type().is_symlink());
            assert_eq!(
                entry.link_name().unwrap().unwrap(),
                Path::new("/bin/busybox")
            );
            saw.1 = true;
        }
    }
    assert_eq!(
        saw,
        (true, true),
        "bin/busybox or bin/sh missing from the layer"
    );
}

#[test]
fn name_sets_annotations_and_repo_tags() {
    let dir = tempfile::tempdir().unwrap();
    let files = read_tar(&build(
        dir.path(),
        "image.tar",
        &["--name", "registry.test:5000/demo/bb:v1"],
    ));
    let index: ImageIndex = serde_json::from_slice(&files["index.json"]).unwrap();
    let annotations = index.manifests()[0].annotations().clone().unwrap();
    assert_eq!(
        annotations["io.containerd.image.name"],
        "registry.test:5000/demo/bb:v1"
    );
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "v1");
    let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(
        docker[0]["RepoTags"],
        serde_json::json!(["registry.test:5000/demo/bb:v1"])
    );
}

#[test]
fn two_builds_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let first = build(dir.path(), "a.tar", &[]);
    let second = build(dir.path(), "b.tar", &[]);
    assert!(first == second, "two image builds differ");
}

#[test]
fn a_bad_name_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.tar");
    let result = husk_rootfs(&[
        "image",
        "--out",
        out.to_str().unwrap(),
        "--name",
        "Not Valid",
    ]);
    assert!(!result.status.success());
    assert!(stderr(&result).contains("Not Valid"), "{}", stderr(&result));
    assert!(!out.exists());
}
