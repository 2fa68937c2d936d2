"""A minimal stand-in for the Kubernetes API, enough for `helm template --dry-run=server`:
version and legacy discovery for the kinds the chart renders, GET of Secrets and the list
of ServiceCIDRs from in-memory state (what the chart's `lookup` calls read), and 404 for
everything else.

It listens on 127.0.0.1 only and records every request path.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# group/version -> [(plural, kind, namespaced)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("secrets", "Secret", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "cert-manager.io/v1": [("certificates", "Certificate", True), ("issuers", "Issuer", True)],
    "monitoring.coreos.com/v1": [
        ("servicemonitors", "ServiceMonitor", True),
        ("prometheusrules", "PrometheusRule", True),
    ],
    "networking.k8s.io/v1": [("servicecidrs", "ServiceCIDR", False)],
}

_SECRET = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets/(?P<name>[^/?]+)$")


class FakeApiServer:
    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict] = {}
        # spec.cidrs of each ServiceCIDR object, by name.
        self.service_cidrs: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }))
        return path

    def put_secret(self, secret: dict) -> None:
        md = secret["metadata"]
        with self._lock:
            self.secrets[(md["namespace"], md["name"])] = secret

    def _route(self, path: str) -> tuple[int, dict]:
        bare = path.split("?", 1)[0]
        if bare == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        if bare == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if bare == "/apis":
            groups = {}
            for gv in RESOURCES:
                if "/" in gv:
                    g, v = gv.split("/")
                    entry = {"groupVersion": gv, "version": v}
                    groups[g] = {"name": g, "versions": [entry], "preferredVersion": entry}
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": list(groups.values())}
        gv = bare.removeprefix("/api/").removeprefix("/apis/")
        if gv in RESOURCES and bare in (f"/api/{gv}", f"/apis/{gv}"):
            return 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": [
                    {"name": plural, "singularName": kind.lower(), "namespaced": namespaced,
                     "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                    for plural, kind, namespaced in RESOURCES[gv]
                ],
            }
        if bare == "/apis/networking.k8s.io/v1/servicecidrs":
            with self._lock:
                items = [
                    {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                     "metadata": {"name": name}, "spec": {"cidrs": cidrs}}
                    for name, cidrs in sorted(self.service_cidrs.items())
                ]
            return 200, {"kind": "ServiceCIDRList", "apiVersion": "networking.k8s.io/v1",
                         "metadata": {}, "items": items}
        m = _SECRET.match(bare)
        if m:
            with self._lock:
                secret = self.secrets.get((m["ns"], m["name"]))
            if secret:
                return 200, secret
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404, "message": f"{bare} not found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                with outer._lock:
                    outer.requests.append(self.path)
                code, body = outer._route(self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
