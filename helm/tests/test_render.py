"""helm lint --strict and helm template for every values case, and every rendered object
validated strictly (unknown fields rejected) against the Kubernetes JSON schemas."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
from kubernetes_validate.utils import schema_contents

import chart
import crd_schemas

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
# Objects named after DNS labels (they become DNS names or env var prefixes).
LABEL_NAMED = {"Service", "Pod", "Deployment", "DaemonSet"}


def schema_errors(doc: dict, version: str) -> list[str]:
    """Every strict-schema error of a built-in object (kubernetes_validate stops at the first)."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    base = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = schema_contents(f"{base}/{doc['kind'].lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return [f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version}"]
    defs = schema_contents(f"{base}/_definitions.json", version)
    # As kubernetes_validate.validate builds it: both documents carry their own $id.
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(defs) @ registry
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def is_builtin(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) not in crd_schemas.BY_KIND


@pytest.mark.parametrize("case", chart.CASES)
def test_helm_lint_strict(case):
    proc = chart.helm("lint", "--strict", str(chart.CHART), "--values", chart.values_file(case),
                      "--namespace", chart.NAMESPACE, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out


@pytest.mark.parametrize("case", chart.CASES)
def test_renders(case):
    objs = chart.objects(case)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "DaemonSet", "Service", "ClusterRole"} <= kinds, kinds


@pytest.mark.parametrize("version", chart.KUBE_VERSIONS)
@pytest.mark.parametrize("case", chart.CASES)
def test_objects_match_kubernetes_schemas_strictly(case, version):
    failures = []
    for doc in chart.objects(case):
        if not is_builtin(doc):
            continue
        # The public entry point agrees (and raises on the first error).
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
        for err in schema_errors(doc, version):
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", chart.CASES)
def test_kubernetes_validate_cli_strict_accepts_the_render(case, tmp_path):
    """The same check as users run it: `kubernetes-validate --strict` on the rendered file.
    Only the custom resources (checked below) may be reported as having no schema."""
    cli = Path(sys.executable).with_name("kubernetes-validate")
    assert cli.exists(), f"{cli} missing: pip install kubernetes-validate"
    rendered = tmp_path / f"{case}.yaml"
    rendered.write_text(chart.render_case(case))
    for version in chart.KUBE_VERSIONS:
        proc = subprocess.run([str(cli), "--strict", "--quiet", "-k", version, str(rendered)],
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        for line in out.splitlines():
            assert line.startswith("WARN") and "Couldn't find schema for kind" in line, line
            assert any(f"kind {kind} with api version {api}" in line
                       for api, kind in crd_schemas.BY_KIND), line


@pytest.mark.parametrize("case", chart.CASES)
def test_custom_resources_match_their_schemas_strictly(case):
    failures = []
    for doc in chart.objects(case):
        if is_builtin(doc):
            continue
        schema = crd_schemas.BY_KIND[(doc["apiVersion"], doc["kind"])]
        for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
    assert not failures, "\n".join(failures)


def test_strict_validation_rejects_unknown_fields():
    """The validator in use does reject what the API server would drop or refuse."""
    deployment = chart.one(chart.objects("default"), "Deployment", "meshlite-control-plane")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    del deployment["spec"]["selector"]
    errors = schema_errors(deployment, chart.KUBE_VERSIONS[-1])
    assert any("imagePullPolicyy" in e for e in errors), errors
    assert any("'selector' is a required property" in e for e in errors), errors


@pytest.mark.parametrize("case", chart.CASES)
def test_object_names_namespaces_and_labels(case):
    objs = chart.objects(case)
    seen = set()
    for o in objs:
        md = o["metadata"]
        key = (o["apiVersion"], o["kind"], md["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        pattern = DNS1123_LABEL if o["kind"] in LABEL_NAMED else DNS1123_SUBDOMAIN
        assert pattern.match(md["name"]) and len(md["name"]) <= 63, f"bad name {md['name']!r}"
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in md, key
        else:
            assert md.get("namespace") == chart.NAMESPACE, key
        labels = dict(md.get("labels", {}))
        if o["kind"] in chart.WORKLOAD_KINDS and o["kind"] != "Pod":
            labels.update(chart.pod_labels(o))
        for k, v in labels.items():
            assert isinstance(v, str) and LABEL_VALUE.match(v) and len(v) <= 63, (key, k, v)
        assert md["labels"]["app.kubernetes.io/instance"] == chart.RELEASE, key
        assert md["labels"]["app.kubernetes.io/part-of"] == "meshlite", key


# The DNS agents need the service CIDRs in every render (no values file sets them here).
SERVICE_CIDRS = ("--set", "dns.serviceCIDRs={198.19.0.0/16}")


def test_without_cluster_cidr_local_traffic_is_detected_by_node_cidr():
    (ds,) = [o for o in chart.documents(chart.render(None, *SERVICE_CIDRS)) if o["kind"] == "DaemonSet" and "node-agent" in o["metadata"]["name"]]
    args = chart.arg_map(chart.pod_spec(ds)["containers"][0])
    assert args["detect-local-mode"] == "NodeCIDR"
    assert "cluster-cidr" not in args


def test_detect_local_modes_need_their_value_with_a_clear_message():
    for sets, message in [
        (["nodeAgent.detectLocalMode=ClusterCIDR"], "nodeAgent.clusterCIDR is required"),
        (["nodeAgent.detectLocalMode=BridgeInterface"], "nodeAgent.podBridgeInterface is required"),
        (["nodeAgent.detectLocalMode=InterfaceNamePrefix"], "nodeAgent.podInterfaceNamePrefix is required"),
    ]:
        extra = [a for s in sets for a in ("--set", s)]
        proc = chart.helm(*chart.template_args(None, *SERVICE_CIDRS, *extra), check=False)
        assert proc.returncode != 0, sets
        assert message in proc.stderr, proc.stderr
        assert "e.g." in proc.stderr, "the message shows an example"
    proc = chart.helm(
        *chart.template_args(
            None,
            *SERVICE_CIDRS,
            "--set",
            "nodeAgent.detectLocalMode=InterfaceNamePrefix",
            "--set",
            "nodeAgent.podInterfaceNamePrefix=eni",
        )
    )
    (ds,) = [o for o in chart.documents(proc.stdout) if o["kind"] == "DaemonSet" and "node-agent" in o["metadata"]["name"]]
    args = chart.arg_map(chart.pod_spec(ds)["containers"][0])
    assert args["detect-local-mode"] == "InterfaceNamePrefix"
    assert args["pod-interface-name-prefix"] == "eni"


def test_chart_refuses_kubernetes_older_than_its_minimum():
    proc = chart.helm(*chart.template_args("default", "--kube-version", "1.24.0"), check=False)
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr and "incompatible" in proc.stderr, proc.stderr
    chart.helm(*chart.template_args("default", "--kube-version", "1.25.0"))


@pytest.mark.parametrize("case", chart.CASES)
def test_install_notes_render(case):
    """NOTES.txt renders for every case (helm install --dry-run=client needs no cluster)."""
    proc = chart.helm("install", chart.RELEASE, str(chart.CHART), "--namespace", chart.NAMESPACE,
                      "--values", chart.values_file(case), "--dry-run=client", "--hide-secret")
    notes = proc.stdout.partition("NOTES:\n")[2]
    assert "helm test" in notes or not chart.case_values(case).get("tests", {}).get("enabled", True)
    assert "Remove kube-proxy" in notes and "Point kubelet at the meshlite DNS Service" in notes
    endpoint = chart.case_values(case).get("controlPlane", {}).get("endpoint")
    assert ("WARNING: controlPlane.endpoint is not set" in notes) == (not endpoint), notes


def test_packaged_chart_renders_like_the_directory(tmp_path):
    """`helm package` keeps everything the chart needs (schema, README, templates)."""
    out = chart.helm("package", str(chart.CHART), "--destination", str(tmp_path)).stdout
    (tgz,) = list(tmp_path.glob("meshlite-*.tgz"))
    assert str(tgz) in out
    listing = subprocess.run(["tar", "tzf", str(tgz)], capture_output=True, text=True, check=True).stdout.split()
    for f in ("meshlite/values.schema.json", "meshlite/README.md", "meshlite/templates/NOTES.txt"):
        assert f in listing, listing
    from_tgz = chart.helm("template", chart.RELEASE, str(tgz), "--namespace", chart.NAMESPACE,
                          "--values", chart.values_file("default")).stdout
    assert chart.normalized_render(from_tgz) == chart.normalized_render(chart.render_case("default"))
