//! Directories of ordinary multi-document Kubernetes YAML -> normalized resources.
//!
//! Used by the file source (`--source file:<dir>`) and by the agents' `render`
//! commands. A file that is not valid YAML is an error naming the file; an object
//! that cannot be used (unknown kind, invalid content) is a warning naming the file
//! and the object, and the rest of the file is still used.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshlite_proto::model::{Resource, ResourceKey, ResourceKind};

use crate::normalize::{Normalized, Options};
use crate::{KubeObject, key_from_meta};

/// A file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {reason}")]
    Yaml { path: PathBuf, reason: String },
}

/// One object from a manifest, normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub resource: Resource,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, when set.
    pub trigger: Option<SystemTime>,
}

/// Everything usable in a set of manifests, and what was not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub objects: Vec<Object>,
    /// `path: reason` for every skipped object or dropped field.
    pub warnings: Vec<String>,
    /// Objects of a known kind that failed to normalize: their last good state is kept.
    pub rejected: Vec<ResourceKey>,
}

impl Manifests {
    /// The resources alone.
    pub fn resources(&self) -> Vec<Resource> {
        self.objects.iter().map(|o| o.resource.clone()).collect()
    }
}

/// Whether a path is a manifest file by name (`.yaml`, `.yml`, `.json`; not hidden,
/// so editors' swap files and atomic-write temporaries are ignored).
pub fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.')
        && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
}

/// The manifest files directly in `dir`, sorted.
///
/// # Errors
/// The directory cannot be read.
pub fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_file() && is_manifest(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every manifest in a directory; the first unusable file is an error.
///
/// # Errors
/// The directory or a file cannot be read, or a file is not valid YAML.
pub fn load_dir(dir: &Path, opts: &Options) -> Result<Manifests, ManifestError> {
    let mut all = Manifests::default();
    for path in list_dir(dir)? {
        let m = load_file(&path, opts)?;
        all.objects.extend(m.objects);
        all.warnings.extend(m.warnings);
        all.rejected.extend(m.rejected);
    }
    Ok(all)
}

/// Loads one manifest file.
///
/// # Errors
/// The file cannot be read or is not valid YAML.
pub fn load_file(path: &Path, opts: &Options) -> Result<Manifests, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, opts)
}

/// Parses multi-document YAML text; `path` names it in errors and warnings.
///
/// # Errors
/// The text is not valid YAML.
pub fn parse(path: &Path, text: &str, opts: &Options) -> Result<Manifests, ManifestError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Yaml {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut out = Manifests::default();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let at = format!("{} (document {})", path.display(), i + 1);
        if let Some(items) = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .filter(|k| k.ends_with("List"))
            .and(doc.get("items"))
            .and_then(|i| i.as_array())
        {
            for (j, item) in items.iter().enumerate() {
                object(
                    &format!("{at} item {}", j + 1),
                    item.clone(),
                    opts,
                    &mut out,
                );
            }
        } else {
            object(&at, doc, opts, &mut out);
        }
    }
    Ok(out)
}

fn object(at: &str, doc: serde_json::Value, opts: &Options, out: &mut Manifests) {
    let api_version = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind = doc.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let result = match ResourceKind::of_k8s(api_version, kind) {
        Some(ResourceKind::Service) => read::<core::Service>(doc, opts),
        Some(ResourceKind::EndpointSlice) => read::<discovery::EndpointSlice>(doc, opts),
        Some(ResourceKind::Node) => read::<core::Node>(doc, opts),
        None if api_version.is_empty() || kind.is_empty() => Err((
            "not a Kubernetes object (no apiVersion or kind)".to_string(),
            None,
        )),
        None => Err((
            format!(
                "{api_version} {kind} is not used by meshlite (only v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node); ignored"
            ),
            None,
        )),
    };
    match result {
        Ok((normalized, trigger)) => {
            let resource = normalized.value;
            let key = resource.key();
            out.warnings.extend(
                normalized
                    .warnings
                    .into_iter()
                    .map(|w| format!("{at}: {key}: {w}")),
            );
            out.objects.push(Object { resource, trigger });
        }
        Err((e, key)) => {
            out.warnings.push(format!("{at}: {e}"));
            out.rejected.extend(key);
        }
    }
}

/// An object of a known kind: normalized with its trigger time, or why not (with
/// its key when it has one, so its last good state is kept).
type Read = Result<(Normalized<Resource>, Option<SystemTime>), (String, Option<ResourceKey>)>;

fn read<K: KubeObject>(doc: serde_json::Value, opts: &Options) -> Read {
    // The key is read from the metadata alone: an object that does not even
    // deserialize still names what to keep.
    let key =
        serde_json::from_value::<ObjectMeta>(doc.get("metadata").cloned().unwrap_or_default())
            .ok()
            .and_then(|m| key_from_meta(K::RESOURCE_KIND, &m));
    let obj: K = serde_json::from_value(doc).map_err(|e| (e.to_string(), key.clone()))?;
    let trigger = obj.trigger_time();
    obj.normalize(opts)
        .map(|n| (n, trigger))
        .map_err(|e| (e.to_string(), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_loads_without_warnings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
        let m = load_dir(&dir, &Options::default()).unwrap();
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let keys: Vec<String> = m
            .objects
            .iter()
            .map(|o| o.resource.key().to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "endpointslice/default/clusterip-service-webui",
                "endpointslice/default/headless-service-webui",
                "node/node1",
                "node/node2",
                "service/default/clusterip-service",
                "service/default/headless-service",
            ]
        );
    }

    #[test]
    fn broken_yaml_names_the_file() {
        let err = parse(
            Path::new("/m/bad.yaml"),
            "kind: Service\n  - : [",
            &Options::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("/m/bad.yaml: invalid YAML"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kinds_and_bad_objects_are_warnings() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 198.19.0.1}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 300.0.0.1}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: typed}\nspec: {ports: nope}\n";
        let m = parse(Path::new("m.yaml"), text, &Options::default()).unwrap();
        assert_eq!(m.objects.len(), 1);
        assert_eq!(m.warnings.len(), 3, "{:?}", m.warnings);
        assert!(m.warnings[0].contains("apps/v1 Deployment is not used"));
        assert!(m.warnings[1].contains("invalid IP \"300.0.0.1\""));
        assert!(m.warnings[2].starts_with("m.yaml (document 4)"));
        assert_eq!(
            m.rejected,
            vec![
                ResourceKey::service("default", "bad"),
                ResourceKey::service("default", "typed")
            ]
        );
    }

    #[test]
    fn lists_are_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n";
        let m = parse(Path::new("l.yaml"), text, &Options::default()).unwrap();
        assert_eq!(m.objects.len(), 1);
    }
}
