"""The DNS agents' chart values: the cluster's CIDRs passed to the agents (the service CIDRs
from the value or looked up from ServiceCIDR objects, against a stand-in API server on
127.0.0.1), and the optional PrometheusRule and Grafana dashboard ConfigMaps."""

from __future__ import annotations

import json

import chart
from fake_apiserver import FakeApiServer


def _dns_args(objs: list[dict]) -> dict[str, str | None]:
    (container,) = chart.containers(chart.by_component(objs, "dns-agent"))
    return chart.arg_map(container)


def test_cidrs_reach_the_agents():
    args = _dns_args(chart.objects("default"))
    assert args["pod-cidr"] == "10.244.0.0/16", "defaults to nodeAgent.clusterCIDR"
    assert args["service-cidr"] == "10.96.0.0/12"
    assert args["serve-stale"] == "0s"
    assert "udp-workers" not in args, "the agent defaults to its CPUs"
    out = chart.render("default", "--set", "dns.podCIDRs={10.244.0.0/16,fd00:10:244::/56}",
                       "--set", "dns.udpWorkers=2", "--set", "dns.serveStale=1h")
    args = _dns_args(chart.documents(out))
    assert args["pod-cidr"] == "10.244.0.0/16,fd00:10:244::/56"
    assert args["udp-workers"] == "2"
    assert args["serve-stale"] == "1h"


def test_service_cidrs_are_required_without_a_cluster():
    proc = chart.helm(*chart.template_args(None, "--set", "nodeAgent.clusterCIDR={10.244.0.0/16}"), check=False)
    assert proc.returncode != 0
    assert "dns.serviceCIDRs is required" in proc.stderr, proc.stderr
    assert "10.96.0.0/12" in proc.stderr, "the message shows an example"


def test_service_cidrs_are_looked_up_from_servicecidr_objects(tmp_path):
    with FakeApiServer() as api:
        api.service_cidrs = {"kubernetes": ["10.96.0.0/12", "fd00:10:96::/112"], "extra": ["10.100.0.0/16"]}
        kc = api.write_kubeconfig(tmp_path / "kubeconfig")
        out = chart.helm(*chart.template_args("default", "--dry-run=server", "--disable-openapi-validation",
                                              "--set-json", "dns.serviceCIDRs=[]"),
                         kubeconfig=str(kc)).stdout
        assert "/apis/networking.k8s.io/v1/servicecidrs" in [r.split("?")[0] for r in api.requests]
        assert _dns_args(chart.documents(out))["service-cidr"] == "10.100.0.0/16,10.96.0.0/12,fd00:10:96::/112"
        # A value wins over the cluster's objects.
        out = chart.helm(*chart.template_args("default", "--dry-run=server", "--disable-openapi-validation"),
                         kubeconfig=str(kc)).stdout
        assert _dns_args(chart.documents(out))["service-cidr"] == "10.96.0.0/12"
        # No objects: required again.
        api.service_cidrs = {}
        proc = chart.helm(*chart.template_args("default", "--dry-run=server", "--disable-openapi-validation",
                                               "--set-json", "dns.serviceCIDRs=[]"),
                          kubeconfig=str(kc), check=False)
        assert proc.returncode != 0 and "dns.serviceCIDRs is required" in proc.stderr, proc.stderr


def test_prometheus_rule_and_dashboard_are_optional():
    default = chart.objects("default")
    assert not chart.find(default, "PrometheusRule")
    assert not [c for c in chart.find(default, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]

    objs = chart.objects("otel")
    rule = chart.one(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    for needed in ("MeshliteDNSDown", "MeshliteDNSLatencyHigh", "MeshliteDNSErrorsHigh",
                   "MeshliteDNSForwardErrorsHigh", "MeshliteDNSForwardFailing",
                   "MeshliteDNSProgrammingLatencyHigh"):
        assert needed in alerts, alerts
    for r in rules:
        assert "{{" not in r["expr"] and "Values" not in r["expr"], r["expr"]
        assert 'app_kubernetes_io_component="dns-agent"' in r["expr"], r["expr"]

    dashboards = {c["metadata"]["name"]: c for c in chart.find(objs, "ConfigMap")
                  if c["metadata"]["labels"].get("grafana_dashboard") == "1"}
    dashboard = dashboards["meshlite-dashboard-dns"]
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "meshlite"}
    assert json.loads(dashboard["data"]["meshlite-dns.json"]) == json.loads(
        (chart.CHART / "dashboards" / "dns.json").read_text())

    out = chart.render("otel", "--set", 'metrics.prometheusRule.selector=job="kube-dns"')
    rule = chart.one(chart.documents(out), "PrometheusRule")
    assert all('job="kube-dns"' in r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
