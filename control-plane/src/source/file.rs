//! `--source file:<dir>`: a directory of manifests, polled for changes.
//!
//! Polling (default every 200 ms) rather than inotify keeps this portable and
//! needs no extra dependency; it costs one `stat` per file per poll. A file is read
//! once its size and modification time have been stable for one poll, so a write in
//! progress is not picked up half-done. A file that does not parse is reported with
//! its path and reason, and its last good content keeps being served. An object's
//! trigger time is its EndpointSlice annotation when set, else the file's mtime.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::metrics::{EventLabels, EventType, KindLabels, Metrics};
use crate::store::{Cause, Encoded, Kind, Store};
use meshlite_k8s::manifests::{self, Manifests};
use meshlite_k8s::normalize::Options;

type Stamp = (SystemTime, u64);

/// See the module docs.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    poll: Duration,
    opts: Options,
    store: Arc<Store>,
    metrics: Metrics,
    files: BTreeMap<PathBuf, FileState>,
    loaded_once: bool,
}

#[derive(Debug, Default)]
struct FileState {
    /// Stamp of the content in `good` (or of the last failed attempt).
    loaded: Option<Stamp>,
    /// A new stamp seen once; read when seen again unchanged.
    candidate: Option<Stamp>,
    good: Option<Manifests>,
    mtime: Option<SystemTime>,
}

impl FileSource {
    pub fn new(
        dir: PathBuf,
        poll: Duration,
        opts: Options,
        store: Arc<Store>,
        metrics: Metrics,
    ) -> Self {
        Self {
            dir,
            poll,
            opts,
            store,
            metrics,
            files: BTreeMap::new(),
            loaded_once: false,
        }
    }

    /// Polls forever.
    pub async fn run(mut self) {
        loop {
            self.poll_once();
            tokio::time::sleep(self.poll).await;
        }
    }

    /// One scan: read what changed, and write the result into the store.
    pub fn poll_once(&mut self) {
        let paths = match manifests::list_dir(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.manifest_errors.inc();
                warn!(error = %e, "cannot list the manifest directory; serving the last good state");
                return;
            }
        };
        let mut changed = false;
        let present: HashSet<&PathBuf> = paths.iter().collect();
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;

        for path in &paths {
            let Some(stamp) = stamp(path) else { continue };
            let first = !self.loaded_once;
            let st = self.files.entry(path.clone()).or_default();
            if st.loaded == Some(stamp) {
                st.candidate = None;
                continue;
            }
            // Read at once on the first scan; afterwards wait one poll for stability.
            if !first && st.candidate != Some(stamp) {
                st.candidate = Some(stamp);
                continue;
            }
            st.candidate = None;
            st.loaded = Some(stamp);
            match manifests::load_file(path, &self.opts) {
                Ok(m) => {
                    for w in &m.warnings {
                        warn!("{w}");
                    }
                    st.good = Some(m);
                    st.mtime = Some(stamp.0);
                    changed = true;
                }
                Err(e) => {
                    self.metrics.manifest_errors.inc();
                    warn!(error = %e, "manifest not loaded; serving its last good content");
                }
            }
        }
        if changed || !self.loaded_once {
            self.publish();
        }
    }

    fn publish(&mut self) {
        let mut objects = Vec::new();
        let mut keep = HashSet::new();
        let mut seen = HashSet::new();
        for (path, st) in &self.files {
            let Some(m) = &st.good else { continue };
            let mtime = st.mtime;
            for o in &m.objects {
                let key = o.resource.key();
                if !seen.insert(key.clone()) {
                    warn!(path = %path.display(), %key, "defined in more than one manifest; the last one wins");
                }
                let trigger = o.trigger.or(mtime);
                let value = Encoded::new(&o.resource);
                let cause = if self.loaded_once && !self.store.holds(&value) {
                    super::ingest(value.kind, &value.key, "apply", trigger).1
                } else {
                    Cause::observed_now(trigger)
                };
                objects.push((value, cause));
            }
            for r in &m.rejected {
                self.metrics
                    .invalid_objects
                    .get_or_create(&KindLabels {
                        kind: r.kind().into(),
                    })
                    .inc();
                keep.insert(r.clone());
            }
        }
        let applied = self.store.sync(&Kind::ALL, objects, &keep);
        for kind in Kind::ALL {
            self.metrics
                .api_events
                .get_or_create(&EventLabels {
                    kind: kind.into(),
                    event: EventType::Relist,
                })
                .inc();
        }
        if !self.loaded_once {
            self.loaded_once = true;
            for k in Kind::ALL {
                self.store.mark_synced(k);
            }
            info!(dir = %self.dir.display(), version = applied.version, "manifests loaded");
        } else if applied.changed() {
            info!(
                version = applied.version,
                upserted = applied.upserted,
                removed = applied.removed,
                "manifests changed"
            );
        }
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::store::View;

    fn setup() -> (tempfile::TempDir, Arc<Store>, FileSource) {
        let dir = tempfile::tempdir().unwrap();
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
        for f in ["services.yaml", "endpointslices.yaml", "nodes.yaml"] {
            std::fs::copy(seed.join(f), dir.path().join(f)).unwrap();
        }
        let store = Arc::new(Store::new(Duration::from_secs(60), Kind::ALL));
        let metrics = Metrics::register(&mut Registry::default());
        let src = FileSource::new(
            dir.path().to_path_buf(),
            Duration::from_millis(10),
            Options::default(),
            store.clone(),
            metrics,
        );
        (dir, store, src)
    }

    /// Rewrites a file with a different mtime, as an editor would.
    fn rewrite(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn loads_then_follows_edits_and_keeps_last_good_on_errors() {
        let (dir, store, mut src) = setup();
        src.poll_once();
        assert!(store.is_ready());
        assert_eq!(store.count(Kind::Service), 2);
        assert_eq!(store.count(Kind::EndpointSlice), 2);
        let v = store.version();

        // An edit is picked up once stable (second poll).
        let path = dir.path().join("services.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("198.19.100.100", "198.19.100.101");
        rewrite(&path, &text);
        src.poll_once();
        assert_eq!(
            store.version(),
            v,
            "not read while possibly still being written"
        );
        src.poll_once();
        let d = store.delta(v, &View::Dns).unwrap();
        assert_eq!(d.upserts.len(), 1);
        let v = store.version();

        // A broken file changes nothing: the last good state is still served.
        rewrite(&path, "apiVersion: v1\nkind: Service\n  metadata: [oops");
        src.poll_once();
        src.poll_once();
        assert_eq!(store.version(), v);
        assert_eq!(store.count(Kind::Service), 2);
        assert_eq!(src.metrics.manifest_errors.get(), 1);

        // An object that becomes invalid keeps its last good state too.
        rewrite(&path, &text.replace("198.19.100.101", "198.19.100.999"));
        src.poll_once();
        src.poll_once();
        assert_eq!(store.version(), v);
        assert_eq!(store.count(Kind::Service), 2);

        // Deleting a file deletes its objects.
        std::fs::remove_file(dir.path().join("endpointslices.yaml")).unwrap();
        src.poll_once();
        assert_eq!(store.count(Kind::EndpointSlice), 0);
    }
}
