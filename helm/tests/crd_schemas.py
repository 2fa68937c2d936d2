"""Strict JSON schemas for the custom resources the chart renders.

kubernetes-validate ships schemas for built-in kinds only, so the cert-manager and
Prometheus Operator objects are checked against these instead. They cover the subset of
fields the chart uses (written from the cert-manager.io/v1 and monitoring.coreos.com/v1
API references) and reject every other field, so a typo fails here as the API server's
structural schema would reject it.
"""

from __future__ import annotations

_STR = {"type": "string"}
_STR_LIST = {"type": "array", "items": _STR}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    o: dict = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = required
    return o


_METADATA = _obj(
    {
        "name": _STR,
        "namespace": _STR,
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
    ["name"],
)

_ISSUER_REF = _obj({"name": _STR, "kind": _STR, "group": _STR}, ["name"])

_USAGES = {
    "type": "array",
    "items": {
        "enum": [
            "signing", "digital signature", "content commitment", "key encipherment",
            "key agreement", "data encipherment", "cert sign", "crl sign",
            "encipher only", "decipher only", "any", "server auth", "client auth",
            "code signing", "email protection", "s/mime", "ipsec end system",
            "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
            "microsoft sgc", "netscape sgc",
        ]
    },
}

CERTIFICATE = _obj(
    {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "secretName": _STR,
                "commonName": _STR,
                "dnsNames": _STR_LIST,
                "ipAddresses": _STR_LIST,
                "usages": _USAGES,
                "isCA": {"type": "boolean"},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "privateKey": _obj(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    }
                ),
                "issuerRef": _ISSUER_REF,
            },
            ["secretName", "issuerRef"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

ISSUER = _obj(
    {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Issuer"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "selfSigned": _obj({"crlDistributionPoints": _STR_LIST}),
                "ca": _obj({"secretName": _STR}, ["secretName"]),
            },
            "minProperties": 1,
            "maxProperties": 1,
        },
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

_LABEL_SELECTOR = _obj(
    {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": _obj(
                {"key": _STR, "operator": _STR, "values": _STR_LIST}, ["key", "operator"]
            ),
        },
    }
)

SERVICE_MONITOR = _obj(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": _obj({"any": {"type": "boolean"}, "matchNames": _STR_LIST}),
                "podTargetLabels": _STR_LIST,
                "targetLabels": _STR_LIST,
                "jobLabel": _STR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "port": _STR,
                            "path": _STR,
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "relabelings": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "sourceLabels": {
                                            "type": "array",
                                            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                        },
                                        "targetLabel": _STR,
                                        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                                            "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                                                            "labelkeep", "LabelKeep"]},
                                        "regex": _STR,
                                        "replacement": _STR,
                                        "separator": _STR,
                                    }
                                ),
                            },
                        }
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

PROMETHEUS_RULE = _obj(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": _obj(
                                    {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                    ["expr"],
                                ),
                            },
                        },
                        ["name", "rules"],
                    ),
                },
            },
            ["groups"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

BY_KIND = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
