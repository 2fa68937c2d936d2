"""The certificates the chart generates: a chain openssl accepts for the right purposes, the
names the agents dial, a real mutual TLS handshake, and stability across upgrades through
`lookup` (against a stand-in API server on 127.0.0.1)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import chart
from fake_apiserver import FakeApiServer

GENERATED_CASES = [c for c in chart.CASES
                   if not chart.case_values(c).get("certManager", {}).get("enabled")
                   and not chart.case_values(c).get("tls", {}).get("existingSecrets")]


def prefix(case: str) -> str:
    return chart.case_values(case).get("fullnameOverride") or chart.RELEASE


def secrets(objs: list[dict]) -> dict[str, dict[str, bytes]]:
    return {s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s["data"].items()}
            for s in chart.find(objs, "Secret")}


def write_tls(tmp: Path, name: str, data: dict[str, bytes]) -> dict[str, Path]:
    out = {}
    for key, value in data.items():
        p = tmp / f"{name}-{key}"
        p.write_bytes(value)
        out[key] = p
    return out


def openssl(*args: str) -> str:
    try:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("openssl is not installed (apt-get install openssl)")
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def sans(cert: Path) -> set[str]:
    text = openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName")
    body = text.split("\n", 1)[1] if "\n" in text else ""
    return {s.strip() for s in body.replace("\n", ",").split(",") if s.strip()}


def dialed_host(case: str, objs: list[dict]) -> str:
    ds = next(w for w in chart.meshlite_workloads(objs) if chart.component(w) == "node-agent")
    url = chart.arg_map(chart.pod_spec(ds)["containers"][0])["control-plane"]
    return urlsplit(url).hostname


@pytest.mark.parametrize("case", GENERATED_CASES)
def test_generated_chain_names_and_purposes(case, tmp_path):
    objs = chart.objects(case)
    sec = secrets(objs)
    p = prefix(case)
    ca = write_tls(tmp_path, "ca", sec[f"{p}-ca"])
    assert "CA:TRUE" in openssl("x509", "-in", str(ca["tls.crt"]), "-noout", "-ext", "basicConstraints")
    leaves = {comp: write_tls(tmp_path, comp, sec[f"{p}-{comp}-tls"])
              for comp in ("control-plane", "node-agent", "dns-agent")}
    for comp, files in leaves.items():
        assert files["ca.crt"].read_bytes() == ca["tls.crt"].read_bytes(), f"{comp}: ca.crt is the CA"
        purpose = "sslserver" if comp == "control-plane" else "sslclient"
        out = openssl("verify", "-CAfile", str(ca["tls.crt"]), "-purpose", purpose, str(files["tls.crt"]))
        assert out.strip().endswith(": OK"), out
        # The key is the certificate's key.
        assert openssl("pkey", "-in", str(files["tls.key"]), "-pubout") == \
            openssl("x509", "-in", str(files["tls.crt"]), "-noout", "-pubkey")
    assert sans(leaves["node-agent"]["tls.crt"]) == {"DNS:node-agent"}
    assert sans(leaves["dns-agent"]["tls.crt"]) == {"DNS:dns-agent"}
    assert "CN = dns-agent" in openssl("x509", "-in", str(leaves["dns-agent"]["tls.crt"]), "-noout", "-subject")
    values = chart.case_values(case)
    domain = values.get("clusterDomain", "cluster.local")
    svc = f"{p}-control-plane"
    want = {f"DNS:{svc}", f"DNS:{svc}.{chart.NAMESPACE}", f"DNS:{svc}.{chart.NAMESPACE}.svc",
            f"DNS:{svc}.{chart.NAMESPACE}.svc.{domain}"}
    cp = values.get("controlPlane", {})
    if cp.get("service", {}).get("clusterIP"):
        want.add(f"IP Address:{cp['service']['clusterIP']}")
    if cp.get("endpoint"):
        want.add(f"IP Address:{urlsplit(cp['endpoint']).hostname}")
    assert sans(leaves["control-plane"]["tls.crt"]) == want


def _serve_once(server_ctx: ssl.SSLContext, listener: socket.socket, result: dict) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                result["client_subject"] = dict(x[0] for x in peer["subject"])
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            result["error"] = repr(e)


@pytest.mark.parametrize("case", GENERATED_CASES)
def test_generated_certificates_complete_mutual_tls(case, tmp_path):
    """A TLS server with the control plane's Secret requires a client certificate from the CA;
    an agent with its Secret verifies the server under the host it dials (on 127.0.0.1)."""
    objs = chart.objects(case)
    sec = secrets(objs)
    p = prefix(case)
    server = write_tls(tmp_path, "cp", sec[f"{p}-control-plane-tls"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(server["tls.crt"], server["tls.key"])
    server_ctx.load_verify_locations(server["ca.crt"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    host = dialed_host(case, objs)
    for comp in ("node-agent", "dns-agent"):
        client = write_tls(tmp_path, comp, sec[f"{p}-{comp}-tls"])
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_verify_locations(client["ca.crt"])
        client_ctx.load_cert_chain(client["tls.crt"], client["tls.key"])
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(10)
            result: dict = {}
            t = threading.Thread(target=_serve_once, args=(server_ctx, listener, result))
            t.start()
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                    assert tls.recv(2) == b"ok"
            t.join(timeout=10)
        assert "error" not in result, result
        assert result["client_subject"]["commonName"] == comp


def _template_against(api: FakeApiServer, kubeconfig: Path, *extra: str) -> list[dict]:
    out = chart.helm(*chart.template_args("default", "--dry-run=server", "--disable-openapi-validation", *extra),
                     kubeconfig=str(kubeconfig)).stdout
    return chart.documents(out)


def _store(api: FakeApiServer, objs: list[dict]) -> None:
    """Stores the Secrets as `helm install` leaves them: with the release's ownership metadata."""
    for s in chart.find(objs, "Secret"):
        s["metadata"].setdefault("annotations", {}).update({
            "meta.helm.sh/release-name": chart.RELEASE,
            "meta.helm.sh/release-namespace": chart.NAMESPACE,
        })
        api.put_secret(s)


def _data(objs: list[dict]) -> dict[str, dict]:
    return {s["metadata"]["name"]: s["data"] for s in chart.find(objs, "Secret")}


def test_certificates_survive_upgrades_through_lookup(tmp_path):
    with FakeApiServer() as api:
        kc = api.write_kubeconfig(tmp_path / "kubeconfig")
        first = _data(_template_against(api, kc))
        assert any(r.startswith("/api/v1/namespaces/kube-system/secrets/meshlite-ca") for r in api.requests), \
            "the chart looked the CA up"
        _store(api, [s for s in chart.find(_template_against(api, kc), "Secret")])
        installed = {name: dict(api.secrets[("kube-system", name)]["data"]) for _, name in api.secrets}

        # An upgrade with the same values keeps everything byte for byte.
        assert _data(_template_against(api, kc)) == installed
        assert first != installed, "without a cluster every render generates anew"

        # New names for the control plane: only its certificate is re-issued, by the same CA.
        moved = _data(_template_against(api, kc, "--set", "controlPlane.endpoint=https://192.0.2.77:9443"))
        assert moved["meshlite-ca"] == installed["meshlite-ca"]
        assert moved["meshlite-node-agent-tls"] == installed["meshlite-node-agent-tls"]
        assert moved["meshlite-dns-agent-tls"] == installed["meshlite-dns-agent-tls"]
        assert moved["meshlite-control-plane-tls"]["tls.crt"] != installed["meshlite-control-plane-tls"]["tls.crt"]
        cert = tmp_path / "moved.crt"
        cert.write_bytes(base64.b64decode(moved["meshlite-control-plane-tls"]["tls.crt"]))
        ca = tmp_path / "ca.crt"
        ca.write_bytes(base64.b64decode(installed["meshlite-ca"]["tls.crt"]))
        assert "IP Address:192.0.2.77" in sans(cert)
        assert openssl("verify", "-CAfile", str(ca), str(cert)).strip().endswith(": OK")

        # A deleted agent Secret is re-issued by the kept CA.
        del api.secrets[("kube-system", "meshlite-node-agent-tls")]
        healed = _data(_template_against(api, kc))
        assert healed["meshlite-ca"] == installed["meshlite-ca"]
        assert healed["meshlite-node-agent-tls"]["tls.crt"] != installed["meshlite-node-agent-tls"]["tls.crt"]
        assert healed["meshlite-dns-agent-tls"] == installed["meshlite-dns-agent-tls"]

        # A new CA (its Secret deleted) re-issues every certificate, since they no longer chain to it.
        del api.secrets[("kube-system", "meshlite-ca")]
        fresh = _data(_template_against(api, kc))
        for name in ("meshlite-ca", "meshlite-control-plane-tls", "meshlite-dns-agent-tls"):
            assert fresh[name]["tls.crt"] != installed[name]["tls.crt"], name
