"""The Grafana dashboards the chart ships (`dashboards/*.json`): one ConfigMap each, only when
`metrics.grafanaDashboard.enabled`, labelled for Grafana's sidecar, bodies unchanged; every
dashboard is valid JSON with unique panel ids and uids, a description and a query on every
panel, and every panel of the rule-sync dashboard described in the chart README. Whether the
queries ask only for what the processes export is checked against their real `/metrics` in
`e2e/tests/system.rs` (`rule_sync_dashboard_queries_what_the_processes_export`)."""

from __future__ import annotations

import json

import chart

DASHBOARDS = sorted((chart.CHART / "dashboards").glob("*.json"))


def _configmaps(case: str) -> dict[str, dict]:
    return {c["metadata"]["name"]: c for c in chart.find(chart.objects(case), "ConfigMap")
            if c["metadata"]["labels"].get("grafana_dashboard") == "1"}


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_one_configmap_per_dashboard_file_when_enabled():
    assert not _configmaps("default")
    maps = _configmaps("otel")
    assert len(maps) == len(DASHBOARDS) >= 2, sorted(maps)
    for path in DASHBOARDS:
        (cm,) = [c for c in maps.values() if f"meshlite-{path.stem}.json" in c["data"]]
        assert cm["metadata"]["name"].endswith(f"-dashboard-{path.stem}"), cm["metadata"]["name"]
        assert json.loads(cm["data"][f"meshlite-{path.stem}.json"]) == json.loads(path.read_text())


def test_dashboards_are_well_formed():
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] not in uids, f"{path.name}: uid {d['uid']} used twice"
        uids.add(d["uid"])
        ids = [p["id"] for p in _panels(d)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids {ids}"
        for p in _panels(d):
            if p["type"] == "row":
                continue
            assert p.get("description"), f"{path.name}: panel {p['title']!r} has no description"
            assert p.get("targets") and all(t.get("expr") for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_rule_sync_dashboard_shows_what_operators_need():
    d = json.loads((chart.CHART / "dashboards" / "rule-sync.json").read_text())
    panels = [p for p in _panels(d) if p["type"] != "row"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert any(p["type"] == "heatmap" and "network_programming_duration_seconds_bucket" in p["targets"][0]["expr"]
               and p["targets"][0].get("format") == "heatmap" for p in panels)
    for needed in ("kubeproxy_network_programming_duration_seconds_bucket",
                   "meshlite_control_plane_version_convergence_seconds_bucket",
                   "meshlite_control_plane_agents_behind", "meshlite_control_plane_agents_lag_seconds",
                   "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                   "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                   "meshlite_node_agent_sync_errors_total", "meshlite_control_plane_subscribers",
                   "process_resident_memory_bytes", "meshlite_control_plane_update_bytes_sent_total",
                   "meshlite_control_plane_api_events_total"):
        assert needed in exprs, needed
    assert "by (node, le)" in exprs, "p50/p99 per node"


def test_chart_readme_describes_every_rule_sync_panel():
    readme = (chart.CHART / "README.md").read_text()
    d = json.loads((chart.CHART / "dashboards" / "rule-sync.json").read_text())
    for p in _panels(d):
        if p["type"] != "row":
            assert f"**{p['title']}**" in readme, f"chart README does not describe panel {p['title']!r}"


def test_service_monitor_labels_series_with_the_node():
    sm = chart.one(chart.objects("otel"), "ServiceMonitor")
    (endpoint,) = sm["spec"]["endpoints"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in endpoint["relabelings"]
