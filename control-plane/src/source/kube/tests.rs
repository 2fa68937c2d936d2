//! The watch state machine fed with watcher events, its actions applied to a real
//! store: what agents would be sent.

use std::time::Duration;

use kube::core::Status;
use meshlite_proto::model::Resource;

use super::*;

fn svc(name: &str, ip: &str) -> core::Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
    }))
    .unwrap()
}

struct Harness {
    watch: KindWatch<core::Service>,
    store: Store,
}

impl Harness {
    fn new() -> Self {
        Self {
            watch: KindWatch::new(Arc::new(Options::default())),
            store: Store::new(Duration::from_secs(60), [Kind::Service]),
        }
    }

    fn feed(&mut self, event: Result<Event<core::Service>, watcher::Error>) -> Notes {
        let (action, notes) = self.watch.on_event(event);
        apply(&self.store, Kind::Service, action);
        notes
    }

    fn list(&mut self, objects: &[core::Service]) {
        self.feed(Ok(Event::Init));
        for o in objects {
            self.feed(Ok(Event::InitApply(o.clone())));
        }
        self.feed(Ok(Event::InitDone));
    }

    /// Service name -> cluster IP, as the store holds them.
    fn held(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .store
            .full(&crate::store::View::Dns)
            .upserts
            .iter()
            .map(|b| {
                let r =
                    <meshlite_proto::v1::Resource as prost::Message>::decode(b.clone()).unwrap();
                match Resource::try_from(&r).unwrap() {
                    Resource::Service(s) => (s.name, s.cluster_ips[0].to_string()),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        out.sort();
        out
    }
}

fn gone() -> watcher::Error {
    let mut s = Status::failure("too old resource version", "Expired");
    s.code = 410;
    watcher::Error::WatchError(Box::new(s))
}

fn pair(name: &str, ip: &str) -> (String, String) {
    (name.to_string(), ip.to_string())
}

#[test]
fn a_relist_deletes_what_is_gone_and_nothing_else() {
    let mut h = Harness::new();
    h.list(&[svc("a", "198.19.0.1"), svc("b", "198.19.0.2")]);
    assert!(h.store.is_ready());
    let v = h.store.version();
    // Re-listed: b is gone, a unchanged, c new.
    h.list(&[svc("a", "198.19.0.1"), svc("c", "198.19.0.3")]);
    assert_eq!(
        h.held(),
        vec![pair("a", "198.19.0.1"), pair("c", "198.19.0.3")]
    );
    // One removal and one upsert: a was not touched.
    assert_eq!(h.store.version(), v + 2);
}

#[test]
fn a_410_mid_stream_relists_at_once_and_the_store_moves_only_by_the_difference() {
    let mut h = Harness::new();
    h.list(&[svc("a", "198.19.0.1"), svc("b", "198.19.0.2")]);
    h.feed(Ok(Event::Apply(svc("b", "198.19.0.22"))));
    let v = h.store.version();
    let (action, notes) = h.watch.on_event(Err(gone()));
    assert!(
        matches!(
            action,
            Action::Retry {
                class: retry::Class::Gone,
                wait: None
            }
        ),
        "{action:?}"
    );
    assert_eq!(notes.failing, 1);
    // The watcher re-lists what the API holds now: unchanged.
    h.list(&[svc("a", "198.19.0.1"), svc("b", "198.19.0.22")]);
    assert_eq!(h.store.version(), v, "an unchanged re-list changes nothing");
}

#[test]
fn an_invalid_object_keeps_its_last_good_state_until_it_is_valid_again() {
    let mut h = Harness::new();
    h.list(&[svc("a", "198.19.0.1")]);
    // An update that does not normalize (invalid cluster IP): rejected, kept.
    let notes = h.feed(Ok(Event::Apply(svc("a", "not-an-ip"))));
    assert!(notes.invalid.is_some());
    assert_eq!(h.held(), vec![pair("a", "198.19.0.1")]);
    // A re-list still carrying the invalid object does not delete it either.
    h.list(&[svc("a", "not-an-ip")]);
    assert_eq!(h.held(), vec![pair("a", "198.19.0.1")]);
    // Valid again: taken.
    let notes = h.feed(Ok(Event::Apply(svc("a", "198.19.0.9"))));
    assert!(notes.invalid.is_none());
    assert_eq!(h.held(), vec![pair("a", "198.19.0.9")]);
    h.feed(Ok(Event::Delete(svc("a", "198.19.0.9"))));
    assert!(h.held().is_empty());
}

#[test]
fn an_unchanged_apply_costs_no_version() {
    let mut h = Harness::new();
    h.list(&[svc("a", "198.19.0.1")]);
    let v = h.store.version();
    let mut labelled = svc("a", "198.19.0.1");
    labelled.metadata.labels = Some([("team".to_string(), "web".to_string())].into());
    h.feed(Ok(Event::Apply(labelled)));
    assert_eq!(h.store.version(), v);
}

#[test]
fn errors_back_off_and_a_delivery_resets_and_reports_the_recovery() {
    let mut h = Harness::new();
    h.list(&[svc("a", "198.19.0.1")]);
    let refused = || {
        watcher::Error::WatchStartFailed(kube::Error::Service(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))))
    };
    for i in 1..=5 {
        let (action, notes) = h.watch.on_event(Err(refused()));
        assert!(matches!(
            action,
            Action::Retry { class: retry::Class::Unreachable, wait: Some(w) } if w <= Duration::from_secs(1)
        ));
        assert_eq!(notes.failing, i);
    }
    // Init comes from the watcher itself, not the API server: no recovery yet.
    assert_eq!(h.feed(Ok(Event::Init)).recovered_after, None);
    assert_eq!(
        h.feed(Ok(Event::InitApply(svc("a", "198.19.0.1"))))
            .recovered_after,
        Some(5)
    );
}
