//! The CoreDNS-compatible metrics, checked the way clusters use them: PromQL shaped
//! like CoreDNS's public alerts and dashboard, the chart's own alert rules and its
//! DNS dashboard, each evaluated over two scrapes of the agent's real `/metrics`
//! after real requests through the handler.

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use prometheus_client::registry::Registry;

use super::*;
use crate::dns::{DnsHandler, Transport as Wire, answer_bytes};
use crate::fixtures;
use crate::zone::{PodRecords, Zone, ZoneCell, ZoneConfig};

mod promql;

use promql::{Scrapes, Value, parse_exposition, query};

/// What Prometheus adds to every series it scrapes from a DNS agent through the
/// chart's ServiceMonitor.
const TARGET: &[(&str, &str)] = &[
    ("job", "meshlite-metrics"),
    ("instance", "198.18.0.5:9592"),
    ("namespace", "kube-system"),
    ("app_kubernetes_io_component", "dns-agent"),
];

/// The chart's default `metrics.prometheusRule.selector`.
const RULE_SELECTOR: &str = r#"app_kubernetes_io_component="dns-agent""#;

struct Agent {
    registry: Registry,
    metrics: Arc<Metrics>,
    handler: DnsHandler,
}

fn agent() -> Agent {
    let mut registry = Registry::default();
    let id = Identity::new(
        "0.0.0.0:53".parse().unwrap(),
        &["198.18.0.53:53".parse().unwrap()],
    );
    let metrics = Arc::new(Metrics::register(&mut registry, &id));
    let config = ZoneConfig {
        domain: "cluster.local".into(),
        ttl: 30,
        pod_records: PodRecords::Disabled,
        reverse_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
    };
    let zone = Zone::build(config, &fixtures::rules());
    let handler = DnsHandler::new(Arc::new(ZoneCell::new(zone)), None, metrics.clone(), 1232);
    Agent {
        registry,
        metrics,
        handler,
    }
}

fn query_bytes(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 7;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

impl Agent {
    fn scrape(&self, up: bool) -> promql::Vector {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        let mut v = parse_exposition(&text, TARGET);
        let mut up_labels = promql::Labels::new();
        up_labels.insert("__name__".into(), "up".into());
        for (k, val) in TARGET {
            up_labels.insert((*k).into(), (*val).into());
        }
        v.push((up_labels, if up { 1.0 } else { 0.0 }));
        v
    }

    fn text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// Normal traffic: cluster names over UDP and TCP, a forwarded name that hits
    /// and one that misses the cache, a headless service's endpoints changing.
    async fn healthy_traffic(&self) {
        for _ in 0..20 {
            for (name, t) in [
                ("web.default.svc.cluster.local.", RecordType::A),
                ("db.default.svc.cluster.local.", RecordType::AAAA),
                ("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
                ("nope.default.svc.cluster.local.", RecordType::A),
            ] {
                for wire in [Wire::Udp, Wire::Tcp] {
                    answer_bytes(&self.handler, &query_bytes(name, t), wire)
                        .await
                        .expect("an answer");
                }
            }
            self.metrics.cache_lookup(Some(CacheType::success));
            self.metrics.cache_lookup(None);
            self.metrics.forward(
                ForwardResult::Response(Rcode::NOERROR),
                Duration::from_millis(3),
            );
        }
        self.metrics.cache_entries(CacheType::success, 1);
        self.metrics.cache_entries(CacheType::denial, 1);
        self.metrics
            .programmed(ServiceKind::headless_with_selector, 0.4);
        self.metrics
            .zone_applied(12, 3, 2, Duration::from_millis(1));
        self.metrics.udp_worker_counter(0).inc();
    }

    /// Everything the alerts watch goes wrong.
    fn bad_traffic(&self) {
        for _ in 0..100 {
            self.metrics.request(&Answered {
                qtype: QueryType::A,
                rcode: Rcode::SERVFAIL,
                source: Source::Upstream,
                elapsed: Duration::from_secs(6),
                transport: Transport::udp,
                family: Family4or6::V4,
                request_bytes: 40,
                response_bytes: Some(40),
                truncated: false,
            });
            self.metrics.forward(
                ForwardResult::Response(Rcode::SERVFAIL),
                Duration::from_secs(6),
            );
            self.metrics
                .forward(ForwardResult::Timeout, Duration::from_secs(2));
            self.metrics
                .programmed(ServiceKind::headless_with_selector, 100.0);
        }
        self.metrics.served_stale();
        self.metrics.udp_refused(Refusal::port_zero);
        self.metrics.panicked();
    }
}

/// Two scrapes around the traffic; `bad` adds the failures.
async fn scrapes(bad: bool) -> Scrapes {
    let a = agent();
    a.healthy_traffic().await;
    let before = a.scrape(true);
    a.healthy_traffic().await;
    if bad {
        a.bad_traffic();
    }
    Scrapes {
        before,
        after: a.scrape(!bad),
    }
}

fn series(q: &str, s: &Scrapes) -> promql::Vector {
    match query(q, s) {
        Ok(Value::Vector(v)) => v,
        Ok(Value::Scalar(x)) => panic!("{q}: a scalar ({x}), not a series"),
        Err(e) => panic!("{q}: {e}"),
    }
}

#[tokio::test]
async fn exposes_coredns_names_labels_and_buckets() {
    let a = agent();
    a.healthy_traffic().await;
    let text = a.text();
    let series = parse_exposition(&text, &[]);
    let has = |name: &str, labels: &[(&str, &str)]| {
        series.iter().any(|(l, _)| {
            l.get("__name__").map(String::as_str) == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    };
    let dns = [("server", "dns://:53"), ("zone", "."), ("view", "")];
    let cache = [("server", "dns://:53"), ("zones", "."), ("view", "")];
    let to = ("to", "198.18.0.53:53");
    let with = |base: &[(&'static str, &'static str)], more: &[(&'static str, &'static str)]| {
        base.iter().chain(more).copied().collect::<Vec<_>>()
    };
    for (name, labels) in [
        (
            "coredns_dns_requests_total",
            with(&dns, &[("proto", "udp"), ("family", "1"), ("type", "A")]),
        ),
        (
            "coredns_dns_requests_total",
            with(&dns, &[("proto", "tcp"), ("family", "1"), ("type", "SRV")]),
        ),
        (
            "coredns_dns_responses_total",
            with(&dns, &[("rcode", "NXDOMAIN"), ("plugin", "kubernetes")]),
        ),
        // CoreDNS's TimeBuckets: 0.25 ms doubling to 8.192 s.
        (
            "coredns_dns_request_duration_seconds_bucket",
            with(&dns, &[("le", "0.00025")]),
        ),
        (
            "coredns_dns_request_duration_seconds_bucket",
            with(&dns, &[("le", "8.192")]),
        ),
        (
            "coredns_dns_request_size_bytes_bucket",
            with(&dns, &[("le", "8291.0"), ("proto", "udp")]),
        ),
        (
            "coredns_dns_response_size_bytes_bucket",
            with(&dns, &[("le", "64000.0"), ("proto", "udp")]),
        ),
        (
            "coredns_dns_response_size_bytes_bucket",
            with(&dns, &[("le", "0.0"), ("proto", "tcp")]),
        ),
        (
            "coredns_cache_entries",
            with(&cache, &[("type", "success")]),
        ),
        ("coredns_cache_entries", with(&cache, &[("type", "denial")])),
        (
            "coredns_cache_hits_total",
            with(&cache, &[("type", "success")]),
        ),
        ("coredns_cache_misses_total", with(&cache, &[])),
        ("coredns_cache_requests_total", with(&cache, &[])),
        ("coredns_cache_served_stale_total", with(&cache, &[])),
        ("coredns_forward_requests_total", vec![to]),
        (
            "coredns_forward_responses_total",
            vec![to, ("rcode", "NOERROR")],
        ),
        (
            "coredns_forward_request_duration_seconds_bucket",
            vec![to, ("rcode", "NOERROR"), ("le", "0.00025")],
        ),
        (
            "coredns_proxy_request_duration_seconds_bucket",
            vec![
                to,
                ("proxy_name", "forward"),
                ("rcode", "NOERROR"),
                ("le", "8.192"),
            ],
        ),
        // CoreDNS's programming latency buckets: 1 ms doubling to 524.288 s.
        (
            "coredns_kubernetes_dns_programming_duration_seconds_bucket",
            vec![("service_kind", "headless_with_selector"), ("le", "0.001")],
        ),
        (
            "coredns_kubernetes_dns_programming_duration_seconds_bucket",
            vec![
                ("service_kind", "headless_with_selector"),
                ("le", "524.288"),
            ],
        ),
        (
            "coredns_build_info",
            vec![("version", env!("CARGO_PKG_VERSION")), ("goversion", "")],
        ),
        ("coredns_panics_total", vec![]),
    ] {
        assert!(has(name, &labels), "{name}{labels:?} missing from:\n{text}");
    }
    assert!(!text.contains("meshlite_dns_requests_total"), "{text}");
    assert!(
        !text.contains(".."),
        "a help text ends in two dots:\n{text}"
    );
}

/// Expressions of our own, with the metric names, labels and functions CoreDNS's
/// public alert rules and dashboard use; each must return a series.
#[tokio::test]
async fn coredns_shaped_expressions_return_series() {
    let s = scrapes(false).await;
    for q in [
        r#"absent(up{job="meshlite-metrics"} == 1) or up{job="meshlite-metrics"} == 1"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_dns_request_duration_seconds_bucket{job="meshlite-metrics"}[5m])) by (server, zone, le))"#,
        r#"sum(rate(coredns_dns_responses_total{job="meshlite-metrics",rcode="NXDOMAIN"}[5m])) / sum(rate(coredns_dns_responses_total{job="meshlite-metrics"}[5m]))"#,
        r#"sum(rate(coredns_dns_requests_total{job="meshlite-metrics"}[5m])) by (proto, family)"#,
        r#"sum(rate(coredns_dns_requests_total{job="meshlite-metrics"}[5m])) by (type)"#,
        r#"sum(rate(coredns_dns_responses_total{job="meshlite-metrics"}[5m])) by (rcode)"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_dns_response_size_bytes_bucket{job="meshlite-metrics"}[5m])) by (server, zone, proto, le))"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_dns_request_size_bytes_bucket{job="meshlite-metrics"}[5m])) by (server, zone, proto, le))"#,
        r#"sum(coredns_cache_entries{job="meshlite-metrics"}) by (server, type)"#,
        r#"sum(rate(coredns_cache_hits_total{job="meshlite-metrics"}[5m])) by (server, type)"#,
        r#"sum(rate(coredns_cache_misses_total{job="meshlite-metrics"}[5m])) by (server)"#,
        r#"sum(rate(coredns_forward_responses_total{job="meshlite-metrics",rcode="NOERROR"}[5m])) by (to) / sum(rate(coredns_forward_requests_total{job="meshlite-metrics"}[5m])) by (to)"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_forward_request_duration_seconds_bucket{job="meshlite-metrics"}[5m])) by (to, le))"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_proxy_request_duration_seconds_bucket{job="meshlite-metrics",proxy_name="forward"}[5m])) by (to, le))"#,
        r#"histogram_quantile(0.99, sum(rate(coredns_kubernetes_dns_programming_duration_seconds_bucket{job="meshlite-metrics"}[5m])) by (service_kind, le))"#,
        r#"increase(coredns_panics_total{job="meshlite-metrics"}[10m]) == 0"#,
        r#"count(coredns_build_info{job="meshlite-metrics"}) by (version)"#,
    ] {
        let v = series(q, &s);
        assert!(!v.is_empty(), "{q}: no series");
        assert!(
            v.iter().all(|(_, x)| x.is_finite()),
            "{q}: not finite: {v:?}"
        );
    }
    // The values are right, not just present: 40 of 160 zone answers per round
    // are NXDOMAIN.
    let v = series(
        r#"sum(rate(coredns_dns_responses_total{rcode="NXDOMAIN"}[5m])) / sum(rate(coredns_dns_responses_total[5m]))"#,
        &s,
    );
    assert!((v[0].1 - 0.25).abs() < 1e-9, "{v:?}");
    let v = series(
        r#"sum(increase(coredns_dns_requests_total{proto="tcp"}[5m]))"#,
        &s,
    );
    assert_eq!(v[0].1, 80.0);
}

fn rule_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/meshlite/files/dns-alerts.yaml"
    ))
    .expect("the chart's DNS alert rules");
    let values = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/meshlite/values.yaml"
    ))
    .expect("the chart's values");
    assert!(
        values.contains(&format!("selector: '{RULE_SELECTOR}'")),
        "the chart's default metrics.prometheusRule.selector is no longer {RULE_SELECTOR}"
    );
    let mut out = Vec::new();
    let mut alert = None;
    for line in text.lines().map(str::trim) {
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = Some(a.to_string());
        } else if let Some(e) = line.strip_prefix("expr: ") {
            let e = e
                .replace(
                    "{ {{- .Values.metrics.prometheusRule.selector -}} }",
                    &format!("{{{RULE_SELECTOR}}}"),
                )
                .replace(
                    "{ {{- .Values.metrics.prometheusRule.selector -}} ,",
                    &format!("{{{RULE_SELECTOR},"),
                );
            assert!(!e.contains("{{"), "unrendered template left in {e}");
            out.push((alert.take().expect("expr follows an alert"), e));
        }
    }
    assert!(out.len() >= 7, "{out:?}");
    out
}

/// The chart's alert rules stay quiet on a healthy agent and each fires when its
/// failure happens.
#[tokio::test]
async fn chart_alerts_fire_only_on_failure() {
    let rules = rule_expressions();
    let healthy = scrapes(false).await;
    let bad = scrapes(true).await;
    for (alert, expr) in &rules {
        let quiet = series(expr, &healthy);
        assert!(
            quiet.is_empty(),
            "{alert} fires on a healthy agent: {quiet:?}"
        );
        let fired = series(expr, &bad);
        assert!(!fired.is_empty(), "{alert} does not fire: {expr}");
    }
    let names: Vec<&str> = rules.iter().map(|(a, _)| a.as_str()).collect();
    for needed in [
        "MeshliteDNSDown",
        "MeshliteDNSLatencyHigh",
        "MeshliteDNSErrorsHigh",
        "MeshliteDNSForwardErrorsHigh",
        "MeshliteDNSForwardFailing",
        "MeshliteDNSProgrammingLatencyHigh",
    ] {
        assert!(names.contains(&needed), "{needed} missing: {names:?}");
    }
}

/// Every query of the chart's DNS dashboard returns a series.
#[tokio::test]
async fn chart_dashboard_queries_return_series() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/meshlite/dashboards/dns.json"
    ))
    .expect("the chart's DNS dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let s = scrapes(true).await;
    let mut n = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // Grafana's variables, as "All" selects them.
            let q = expr
                .replace("$__rate_interval", "5m")
                .replace("$job", ".+")
                .replace("$instance", ".+");
            let v = series(&q, &s);
            assert!(!v.is_empty(), "panel {}: {expr}: no series", panel["title"]);
            n += 1;
        }
    }
    assert!(n >= 15, "{n} queries");
}

#[test]
fn source_labels_read_as_coredns_plugins() {
    let mut registry = Registry::default();
    let m = Metrics::register(
        &mut registry,
        &Identity::new("10.96.0.10:53".parse().unwrap(), &[]),
    );
    m.request(&Answered {
        qtype: QueryType::other,
        rcode: Rcode::FORMERR,
        source: Source::Error,
        elapsed: Duration::ZERO,
        transport: Transport::udp,
        family: Family4or6::V6,
        request_bytes: 12,
        response_bytes: None,
        truncated: false,
    });
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"coredns_dns_responses_total{server="dns://10.96.0.10:53",zone=".",view="",rcode="FORMERR",plugin=""} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"proto="udp",family="2",type="other"} 1"#),
        "{text}"
    );
}
