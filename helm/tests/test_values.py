"""values.schema.json and the chart's own checks refuse bad values with a clear message,
and values.yaml is documented line by line (the README's values table comes from it)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

import chart
import readme

SCHEMA = json.loads((chart.CHART / "values.schema.json").read_text())
VALUES_TEXT = (chart.CHART / "values.yaml").read_text()

BAD = [
    # (--set arguments, text the error must contain)
    (["nodeAgent.mode=userspace"], "/nodeAgent/mode"),
    (["identity.mode=spiffe"], "/identity/mode"),
    (["dns.kind=StatefulSet"], "/dns/kind"),
    (["dns.podRecords=all"], "/dns/podRecords"),
    (["nodeAgent.clusterCIDR={10.244.0.0}"], "clusterCIDR"),
    (["nodeAgent.detectLocalMode=LinkLocal"], "detectLocalMode"),
    (["nodeAgent.podInterfaceNamePrefix=eni+"], "podInterfaceNamePrefix"),
    (["nodeAgent.ipvs.scheduler=random"], "scheduler"),
    (["nodeAgent.ipvs.excludeCIDRs={10.96.250.1}"], "excludeCIDRs"),
    (["nodeAgent.ipvs.gracefulTerminationTimeout=forever"], "gracefulTerminationTimeout"),
    (["controlPlane.endpoint=http://cp:9443"], "/controlPlane/endpoint"),
    (["controlPlane.grpcPort=70000"], "grpcPort"),
    (["controlPlane.logFormat=xml"], "logFormat"),
    (["nodeAgent.syncPeriod=soon"], "syncPeriod"),
    (["dns.service.clusterIP=ten.ninety-six"], "clusterIP"),
    (["controlPlane.replicaz=3"], "replicaz"),
    (["nodeAgent.privilegd=true"], "privilegd"),
    (["identity.tokenExpirationSeconds=60"], "tokenExpirationSeconds"),
    (["otel.endpoint=collector:4317"], "/otel/endpoint"),
    (["certManager.enabled=true", "certManager.issuerRef.kind=ClusterIssuer"], "missing property 'name'"),
]

CONFLICTS = [
    (["certManager.enabled=true", "tls.existingSecrets.controlPlane=a",
      "tls.existingSecrets.nodeAgent=b", "tls.existingSecrets.dnsAgent=c"],
     "certManager.enabled and tls.existingSecrets are mutually exclusive"),
    (["tls.existingSecrets.controlPlane=a"],
     "tls.existingSecrets: set all three of controlPlane, nodeAgent and dnsAgent"),
]


def set_args(sets: list[str]) -> list[str]:
    out = []
    for s in sets:
        out += ["--set", s]
    return out


@pytest.mark.parametrize("sets,needle", BAD, ids=[b[0][0] for b in BAD])
def test_schema_rejects_bad_values(sets, needle):
    proc = chart.helm(*chart.template_args("default", *set_args(sets)), check=False)
    assert proc.returncode != 0, f"{sets} rendered"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("sets,needle", CONFLICTS, ids=["cert-manager+existing", "partial-existing"])
def test_contradicting_values_fail_with_a_clear_message(sets, needle):
    proc = chart.helm(*chart.template_args("default", *set_args(sets)), check=False)
    assert proc.returncode != 0, f"{sets} rendered"
    assert needle in proc.stderr, proc.stderr


def test_token_identity_needs_kubernetes_1_30():
    proc = chart.helm(*chart.template_args("token-identity", "--kube-version", "1.29.0"), check=False)
    assert proc.returncode != 0
    assert "identity.mode=serviceAccountToken needs Kubernetes 1.30 or newer" in proc.stderr, proc.stderr
    chart.helm(*chart.template_args("token-identity", "--kube-version", "1.30.0"))
    chart.helm(*chart.template_args("default", "--kube-version", "1.29.0"))


def test_defaults_and_every_case_satisfy_the_schema():
    validator = jsonschema.Draft7Validator(SCHEMA)
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    defaults = yaml.safe_load(VALUES_TEXT)
    assert not list(validator.iter_errors(defaults))
    for case in chart.CASES:
        merged = _merge(yaml.safe_load(VALUES_TEXT), chart.case_values(case))
        errors = [e.message for e in validator.iter_errors(merged)]
        assert not errors, (case, errors)


def test_schema_covers_every_value():
    """Every key in values.yaml is declared in the schema (which rejects unknown keys)."""
    missing = []

    def walk(values: dict, schema: dict, path: str) -> None:
        props = schema.get("properties", {})
        assert schema.get("additionalProperties") is False, f"{path or '<root>'}: unknown keys must be rejected"
        for k, v in values.items():
            if k not in props:
                missing.append(f"{path}{k}")
                continue
            sub = props[k]
            sub = SCHEMA["definitions"][sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub
            if isinstance(v, dict) and v and sub.get("properties"):
                walk(v, sub, f"{path}{k}.")

    walk(yaml.safe_load(VALUES_TEXT), SCHEMA, "")
    assert not missing, missing


def test_every_value_is_documented():
    assert not readme.undocumented(VALUES_TEXT)
    values = yaml.safe_load(VALUES_TEXT)
    for path, desc in readme.documented_keys(VALUES_TEXT).items():
        readme.lookup(values, path)  # documents a key that exists
        assert len(desc) > 10, path


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and v:
            _merge(base[k], v)
        else:
            base[k] = v
    return base
