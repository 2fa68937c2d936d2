use std::net::IpAddr;

use meshlite_proto::model::{AddressFamily, Endpoint, EndpointSlice, Node, Service};

use super::*;

fn svc(name: &str, ip: &str) -> Resource {
    Resource::Service(Service::cluster_ip("default", name, ip.parse().unwrap()))
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> Resource {
    Resource::EndpointSlice(EndpointSlice {
        namespace: "default".into(),
        name: name.into(),
        service_name: svc.into(),
        address_family: AddressFamily::Ipv4,
        ports: vec![],
        endpoints: ips
            .iter()
            .map(|ip| Endpoint::ready(ip.parse::<IpAddr>().unwrap()))
            .collect(),
        ignored_by_proxy: false,
    })
}

fn node(name: &str) -> Resource {
    Resource::Node(Node {
        name: name.into(),
        zone: None,
        addresses: vec![],
        pod_cidrs: vec![],
    })
}

fn up(r: Resource) -> Change {
    Change::upsert(&r, Cause::observed_now(None))
}

fn del(k: ResourceKey) -> Change {
    Change::Delete {
        key: k,
        cause: Cause::observed_now(None),
    }
}

fn store() -> Store {
    Store::new(Duration::from_secs(300), Kind::ALL)
}

fn keys(d: &Delta) -> Vec<String> {
    d.upserts
        .iter()
        .map(|b| v1::Resource::decode(b.as_ref()).unwrap().key)
        .collect()
}

#[test]
fn revisions_advance_per_change_and_unchanged_content_is_not_a_change() {
    let s = store();
    let a = s.apply(vec![up(svc("a", "198.19.0.1")), up(svc("b", "198.19.0.2"))]);
    assert_eq!((a.version, a.upserted), (2, 2));
    let a = s.apply(vec![up(svc("a", "198.19.0.1"))]);
    assert_eq!((a.version, a.upserted, a.unchanged), (2, 0, 1));
    assert!(!a.changed());
    let a = s.apply(vec![up(svc("a", "198.19.0.9"))]);
    assert_eq!(a.version, 3);
}

#[test]
fn delta_has_only_changed_keys_and_tombstones() {
    let s = store();
    s.apply(vec![
        up(svc("a", "198.19.0.1")),
        up(svc("b", "198.19.0.2")),
        up(slice("a-1", "a", &["198.18.0.1"])),
    ]);
    let v = s.version();
    s.apply(vec![
        up(slice("a-1", "a", &["198.18.0.2"])),
        del(ResourceKey::service("default", "b")),
    ]);
    let d = s.delta(v, &View::Dns).unwrap();
    assert_eq!(keys(&d), vec!["endpointslice/default/a-1"]);
    assert_eq!(d.removals, vec!["service/default/b"]);
    assert_eq!(d.causes.len(), 2);
    assert!(d.causes[1].removed);
    assert_eq!(d.version, s.version());
    // Nothing since the newest version.
    let d = s.delta(s.version(), &View::Dns).unwrap();
    assert!(d.upserts.is_empty() && d.removals.is_empty());
    // A version from the future (another epoch) cannot be cut.
    assert!(s.delta(s.version() + 1, &View::Dns).is_none());
}

fn kinds(d: &Delta) -> Vec<&'static str> {
    d.upserts
        .iter()
        .map(|b| match v1::Resource::decode(b.as_ref()).unwrap().kind {
            Some(v1::resource::Kind::EndpointSlicePatch(_)) => "patch",
            Some(_) => "whole",
            None => "none",
        })
        .collect()
}

#[test]
fn a_slice_changed_once_goes_as_a_patch_to_those_holding_its_previous_version() {
    let s = store();
    let ips: Vec<String> = (1..=50).map(|i| format!("198.18.0.{i}")).collect();
    let mut ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    s.apply(vec![
        up(svc("a", "198.19.0.1")),
        up(slice("a-1", "a", &ips)),
    ]);
    let v1_ = s.version();
    ips[10] = "198.18.1.99";
    s.apply(vec![up(slice("a-1", "a", &ips))]);
    let whole = s.delta(v1_, &View::Dns).unwrap();
    let d = s.delta_with_patches(v1_, &View::Dns, true).unwrap();
    assert_eq!(kinds(&whole), vec!["whole"]);
    assert_eq!((kinds(&d), d.patches), (vec!["patch"], 1));
    assert_eq!(keys(&d), vec!["endpointslice/default/a-1"]);
    assert!(
        d.upserts[0].len() * 5 < whole.upserts[0].len(),
        "patch {} bytes, slice {}",
        d.upserts[0].len(),
        whole.upserts[0].len()
    );
    // The patch announces the new content hash and applies to the old one.
    let r = v1::Resource::decode(d.upserts[0].as_ref()).unwrap();
    let w = v1::Resource::decode(whole.upserts[0].as_ref()).unwrap();
    assert_eq!(r.hash, w.hash);
    assert_ne!(
        s.hash_of("endpointslice/default/a-1"),
        match r.kind {
            Some(v1::resource::Kind::EndpointSlicePatch(p)) => Some(p.base_hash),
            _ => unreachable!(),
        }
    );

    // Changed twice since: a subscriber at v1_ holds neither base; whole slice.
    let v2 = s.version();
    ips[20] = "198.18.1.98";
    s.apply(vec![up(slice("a-1", "a", &ips))]);
    let d = s.delta_with_patches(v1_, &View::Dns, true).unwrap();
    assert_eq!(kinds(&d), vec!["whole"]);
    // ... but one at v2 gets the newest patch.
    let d = s.delta_with_patches(v2, &View::Dns, true).unwrap();
    assert_eq!(kinds(&d), vec!["patch"]);
    // Unrelated changes after the patch do not spoil it.
    s.apply(vec![up(svc("b", "198.19.0.2"))]);
    let d = s.delta_with_patches(v2, &View::Dns, true).unwrap();
    assert_eq!(kinds(&d), vec!["patch", "whole"]);
    // Full snapshots and inventory diffs are always whole.
    assert!(kinds(&s.full(&View::Dns)).iter().all(|k| *k == "whole"));
    let d = s.diff_inventory(&View::Dns, &HashMap::new());
    assert!(kinds(&d).iter().all(|k| *k == "whole"));
}

#[test]
fn a_patch_no_smaller_than_the_slice_is_not_kept() {
    let s = store();
    let old = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"];
    s.apply(vec![up(slice("a-1", "a", &old))]);
    let v = s.version();
    // Every endpoint replaced: the patch would carry all of them and more.
    let new = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"];
    s.apply(vec![up(slice("a-1", "a", &new))]);
    let d = s.delta_with_patches(v, &View::Dns, true).unwrap();
    assert_eq!((kinds(&d), d.patches), (vec!["whole"], 0));
}

#[test]
fn resurrected_key_is_an_upsert_not_a_removal() {
    let s = store();
    s.apply(vec![up(svc("a", "198.19.0.1"))]);
    let v = s.version();
    s.apply(vec![del(ResourceKey::service("default", "a"))]);
    s.apply(vec![up(svc("a", "198.19.0.2"))]);
    let d = s.delta(v, &View::Dns).unwrap();
    assert_eq!(keys(&d), vec!["service/default/a"]);
    assert!(d.removals.is_empty());
    assert_eq!(s.tombstones(), 0);
}

#[test]
fn views_filter_nodes() {
    let s = store();
    s.apply(vec![
        up(svc("a", "198.19.0.1")),
        up(node("n1")),
        up(node("n2")),
    ]);
    assert_eq!(keys(&s.full(&View::Dns)), vec!["service/default/a"]);
    assert_eq!(
        keys(&s.full(&View::Node("n1".into()))),
        vec!["service/default/a", "node/n1"]
    );
    let d = s.delta(0, &View::Node("n2".into())).unwrap();
    assert_eq!(keys(&d), vec!["service/default/a", "node/n2"]);
}

#[test]
fn full_orders_services_before_slices() {
    let s = store();
    s.apply(vec![
        up(slice("a-1", "a", &["198.18.0.1"])),
        up(svc("z", "198.19.0.3")),
        up(svc("a", "198.19.0.1")),
    ]);
    assert_eq!(
        keys(&s.full(&View::Dns)),
        vec![
            "service/default/a",
            "service/default/z",
            "endpointslice/default/a-1"
        ]
    );
}

#[test]
fn sync_deletes_only_what_is_gone_and_keeps_invalid() {
    let s = store();
    s.apply(vec![
        up(svc("a", "198.19.0.1")),
        up(svc("b", "198.19.0.2")),
        up(svc("c", "198.19.0.3")),
        up(node("n1")),
    ]);
    let v = s.version();
    // Re-list: a unchanged, b gone, c failed to normalize (kept), d new. Nodes untouched.
    let keep: HashSet<ResourceKey> = [ResourceKey::service("default", "c")].into();
    let a = s.sync(
        &[Kind::Service],
        vec![
            (
                Encoded::new(&svc("a", "198.19.0.1")),
                Cause::observed_now(None),
            ),
            (
                Encoded::new(&svc("d", "198.19.0.4")),
                Cause::observed_now(None),
            ),
        ],
        &keep,
    );
    assert_eq!((a.upserted, a.removed, a.unchanged), (1, 1, 1));
    let d = s.delta(v, &View::Node("n1".into())).unwrap();
    assert_eq!(keys(&d), vec!["service/default/d"]);
    assert_eq!(d.removals, vec!["service/default/b"]);
    // The same re-list again changes nothing.
    let a = s.sync(
        &[Kind::Service],
        vec![
            (
                Encoded::new(&svc("a", "198.19.0.1")),
                Cause::observed_now(None),
            ),
            (
                Encoded::new(&svc("d", "198.19.0.4")),
                Cause::observed_now(None),
            ),
        ],
        &keep,
    );
    assert!(!a.changed());
    assert_eq!(s.count(Kind::Service), 3);
    assert_eq!(s.count(Kind::Node), 1);
}

#[test]
fn tombstones_expire_and_old_versions_fall_back() {
    let s = Store::new(Duration::ZERO, Kind::ALL);
    s.apply(vec![up(svc("a", "198.19.0.1")), up(svc("b", "198.19.0.2"))]);
    let v = s.version();
    s.apply(vec![del(ResourceKey::service("default", "a"))]);
    // Retention zero: the tombstone is gone at once, and with it deltas from before it.
    assert_eq!(s.tombstones(), 0);
    assert!(s.delta(v, &View::Dns).is_none());
    assert!(s.delta(s.version(), &View::Dns).is_some());
}

#[test]
fn inventory_diff_sends_only_differences() {
    let s = store();
    s.apply(vec![
        up(svc("a", "198.19.0.1")),
        up(svc("b", "198.19.0.2")),
        up(node("n1")),
    ]);
    let full = s.full(&View::Node("n1".into()));
    let mut inv: HashMap<String, u64> = full
        .upserts
        .iter()
        .map(|b| {
            let r = v1::Resource::decode(b.as_ref()).unwrap();
            (r.key, r.hash)
        })
        .collect();
    let view = View::Node("n1".into());
    let d = s.diff_inventory(&view, &inv);
    assert!(d.upserts.is_empty() && d.removals.is_empty());
    // Its digest matches what the store computes for the view.
    let mut dig = InventoryDigest::default();
    for (k, h) in &inv {
        dig.add(k, *h);
    }
    assert_eq!(dig, s.digest(&view).0);

    inv.insert("service/default/gone".into(), 7);
    inv.insert("service/default/a".into(), 1);
    inv.insert("node/n2".into(), 5);
    let d = s.diff_inventory(&view, &inv);
    assert_eq!(keys(&d), vec!["service/default/a"]);
    assert_eq!(d.removals, vec!["node/n2", "service/default/gone"]);
}

#[tokio::test]
async fn publisher_waits_for_sync_then_debounces() {
    let s = Arc::new(Store::new(Duration::from_secs(60), [Kind::Service]));
    let mut rx = s.subscribe();
    tokio::spawn(s.clone().run_publisher(Duration::from_millis(5)));
    s.apply(vec![up(svc("a", "198.19.0.1"))]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        *rx.borrow_and_update(),
        0,
        "nothing is published before sync"
    );
    s.mark_synced(Kind::Service);
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 1);
    for i in 0..10 {
        s.apply(vec![up(svc("a", &format!("198.19.0.{}", i + 10)))]);
    }
    rx.changed().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(*rx.borrow(), 11);
    // Causes carry the publish time.
    let d = s.delta(1, &View::Dns).unwrap();
    assert!(d.causes[0].published_unix_nanos >= d.causes[0].observed_unix_nanos);
}
