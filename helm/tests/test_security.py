"""Security-relevant and wiring facts of the rendered chart, for every values case."""

from __future__ import annotations

import pytest

import chart

CASES = chart.CASES
BASE_RULES = {
    ("", "services", "list"), ("", "services", "watch"),
    ("", "nodes", "list"), ("", "nodes", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch"),
}
TOKEN_RULES = {("authentication.k8s.io", "tokenreviews", "create")}
COMPONENTS = ("control-plane", "node-agent", "dns-agent")
BINARY = {
    "control-plane": "meshlite-control-plane",
    "node-agent": "meshlite-node-agent",
    "dns-agent": "meshlite-dns-agent",
}


def name(case: str, suffix: str) -> str:
    """An object's name: the release's name prefix (or fullnameOverride) plus suffix."""
    return f"{chart.case_values(case).get('fullnameOverride') or chart.RELEASE}-{suffix}"


def token_mode(case: str) -> bool:
    # The tests render for helm's default Kubernetes version (1.30 or newer), where
    # `auto` (the default) means token identity.
    return chart.case_values(case).get("identity", {}).get("mode", "auto") in ("auto", "serviceAccountToken")


def expanded_rules(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role.get("rules", []):
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    out.add((g, r, v))
    return out


@pytest.mark.parametrize("case", CASES)
def test_rbac_is_exactly_list_watch_on_services_endpointslices_nodes(case):
    objs = chart.objects(case)
    roles = chart.find(objs, "ClusterRole") + chart.find(objs, "Role")
    assert [r["metadata"]["name"] for r in roles] == [name(case, "control-plane")]
    got = expanded_rules(roles[0])
    want = BASE_RULES | (TOKEN_RULES if token_mode(case) else set())
    assert got == want, f"extra: {got - want}, missing: {want - got}"
    assert not any("*" in part for rule in got for part in rule)


@pytest.mark.parametrize("case", CASES)
def test_only_the_control_plane_is_bound_and_agents_mount_no_api_token(case):
    objs = chart.objects(case)
    bindings = chart.find(objs, "ClusterRoleBinding") + chart.find(objs, "RoleBinding")
    assert len(bindings) == 1
    b = bindings[0]
    assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": name(case, "control-plane")}
    assert b["subjects"] == [{"kind": "ServiceAccount", "name": name(case, "control-plane"),
                              "namespace": chart.NAMESPACE}]
    for comp in ("node-agent", "dns-agent"):
        w = chart.by_component(objs, comp)
        spec = chart.pod_spec(w)
        sa = chart.one(objs, "ServiceAccount", spec["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False
        assert spec["automountServiceAccountToken"] is False, comp
    cp = chart.pod_spec(chart.by_component(objs, "control-plane"))
    assert cp["serviceAccountName"] == name(case, "control-plane")


@pytest.mark.parametrize("case", CASES)
def test_no_container_is_privileged_unless_a_value_asks(case):
    asked = chart.case_values(case).get("nodeAgent", {}).get("privileged", False)
    privileged = []
    for w in chart.workloads(chart.objects(case)):
        spec = chart.pod_spec(w)
        assert not spec.get("hostPID") and not spec.get("hostIPC"), w["metadata"]["name"]
        for c in chart.containers(w):
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, c["name"]
            if sc.get("privileged"):
                privileged.append(c["name"])
                continue
            assert sc.get("privileged") is False, f"{c['name']}: privileged must be explicit false"
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
    assert privileged == (["node-agent"] if asked else [])


@pytest.mark.parametrize("case", CASES)
def test_capabilities_are_the_minimum_per_component(case):
    values = chart.case_values(case).get("nodeAgent", {})
    for w in chart.workloads(chart.objects(case)):
        for c in chart.containers(w):
            added = c.get("securityContext", {}).get("capabilities", {}).get("add", [])
            if c["name"] != "node-agent":
                assert added == [], f"{c['name']} adds {added}"
            elif not values.get("privileged"):
                want = ["NET_ADMIN", "NET_RAW"] + (["SYS_MODULE"] if values.get("mode") == "ipvs" else [])
                assert added == want


@pytest.mark.parametrize("case", CASES)
def test_only_the_node_agent_runs_as_root(case):
    for w in chart.workloads(chart.objects(case)):
        psc = chart.pod_spec(w).get("securityContext", {})
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, w["metadata"]["name"]
        if w["kind"] != "Pod" and chart.component(w) == "node-agent":
            assert psc.get("runAsUser") == 0
        else:
            assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, w["metadata"]["name"]


@pytest.mark.parametrize("case", CASES)
def test_node_agent_daemonset(case):
    values = chart.case_values(case).get("nodeAgent", {})
    ds = chart.by_component(chart.objects(case), "node-agent")
    assert ds["kind"] == "DaemonSet"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    spec = chart.pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "tolerates every taint"
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/run/xtables.lock"]["name"]]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert vols[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    assert mounts["/lib/modules"]["readOnly"] is True
    args = chart.arg_map(c)
    assert args["mode"] == values.get("mode", "iptables")
    assert args.get("cluster-cidr") == (",".join(values["clusterCIDR"]) if values.get("clusterCIDR") else None)
    assert args["detect-local-mode"] == (values.get("detectLocalMode") or ("ClusterCIDR" if values.get("clusterCIDR") else "NodeCIDR"))
    assert args["nodeport-addresses"] == ",".join(values.get("nodePortAddresses", ["0.0.0.0/0", "::/0"]))
    assert args["healthz-bind-address"] == "0.0.0.0:10256"
    assert args["metrics-bind-address"] == "127.0.0.1:10249"
    assert ("ipvs-scheduler" in args) == (args["mode"] == "ipvs")
    ipvs = values.get("ipvs", {})
    if args["mode"] == "ipvs":
        assert args["ipvs-graceful-termination-timeout"] == ipvs.get("gracefulTerminationTimeout", "15m")
        assert args.get("ipvs-exclude-cidrs") == (",".join(ipvs["excludeCIDRs"]) if ipvs.get("excludeCIDRs") else None)
        assert ("ipvs-strict-arp" in args) == bool(ipvs.get("strictARP"))
        for flag, key in (("ipvs-tcp-timeout", "tcpTimeout"), ("ipvs-tcpfin-timeout", "tcpFinTimeout"),
                          ("ipvs-udp-timeout", "udpTimeout")):
            assert args.get(flag) == (ipvs[key] if ipvs.get(key, "0s") != "0s" else None), flag
    else:
        assert not any(a.startswith("ipvs-") for a in args), args
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["healthz"]["containerPort"] == 10256 == ports["healthz"]["hostPort"]


@pytest.mark.parametrize("case", CASES)
def test_node_name_comes_from_the_downward_api(case):
    objs = chart.objects(case)
    for comp in ("node-agent", "dns-agent"):
        (c,) = chart.pod_spec(chart.by_component(objs, comp))["containers"]
        assert "node-name" not in chart.arg_map(c), "never a literal node name"
        env = {e["name"]: e for e in c["env"]}
        assert env["MESHLITE_NODE_NAME"] == {
            "name": "MESHLITE_NODE_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
        }


@pytest.mark.parametrize("case", CASES)
def test_selectors_match_exactly_their_own_pod_templates(case):
    objs = chart.objects(case)
    templates = {
        w["metadata"]["name"]: chart.pod_labels(w) for w in chart.meshlite_workloads(objs)
    }
    for w in chart.meshlite_workloads(objs):
        sel = w["spec"]["selector"]
        matched = [n for n, labels in templates.items() if chart.selector_matches(sel, labels)]
        assert matched == [w["metadata"]["name"]], (w["metadata"]["name"], matched)
    for pdb in chart.find(objs, "PodDisruptionBudget"):
        matched = [n for n, labels in templates.items()
                   if chart.selector_matches(pdb["spec"]["selector"], labels)]
        assert matched == [pdb["metadata"]["name"]], matched
    for w in chart.meshlite_workloads(objs):
        aff = chart.pod_spec(w).get("affinity", {}).get("podAntiAffinity", {})
        terms = [t.get("podAffinityTerm", t) for k in aff.values() for t in k]
        for t in terms:
            assert chart.selector_matches(t["labelSelector"], chart.pod_labels(w)), w["metadata"]["name"]


@pytest.mark.parametrize("case", CASES)
def test_services_select_pods_that_have_their_target_ports(case):
    objs = chart.objects(case)
    pods = chart.meshlite_workloads(objs)
    for svc in chart.find(objs, "Service"):
        selected = [w for w in pods if chart.selector_matches({"matchLabels": svc["spec"]["selector"]},
                                                              chart.pod_labels(w))]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for w in selected:
            ports = {(p["name"], p.get("protocol", "TCP")) for c in chart.containers(w) for p in c.get("ports", [])}
            for sp in svc["spec"]["ports"]:
                assert (sp["targetPort"], sp.get("protocol", "TCP")) in ports, (svc["metadata"]["name"], sp)


@pytest.mark.parametrize("case", CASES)
def test_probes_and_resources(case):
    for w in chart.meshlite_workloads(chart.objects(case)):
        (c,) = chart.pod_spec(w)["containers"]
        port_names = {p["name"] for p in c["ports"]}
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] == "admin" in port_names
        admin = next(p["containerPort"] for p in c["ports"] if p["name"] == "admin")
        assert chart.arg_map(c)["admin-listen"] == f"0.0.0.0:{admin}"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("case", CASES)
def test_pods_do_not_get_service_link_env(case):
    """Service links of a release named meshlite would inject MESHLITE_* variables, which
    the binaries read as flags."""
    for w in chart.meshlite_workloads(chart.objects(case)):
        assert chart.pod_spec(w)["enableServiceLinks"] is False, w["metadata"]["name"]


@pytest.mark.parametrize("case", CASES)
def test_control_plane_is_spread_and_protected(case):
    values = chart.case_values(case).get("controlPlane", {})
    objs = chart.objects(case)
    d = chart.by_component(objs, "control-plane")
    assert d["kind"] == "Deployment"
    assert d["spec"]["replicas"] == values.get("replicas", 2)
    aff = chart.pod_spec(d)["affinity"]["podAntiAffinity"]
    mode = values.get("antiAffinity", "preferred")
    assert list(aff) == [f"{mode}DuringSchedulingIgnoredDuringExecution"]
    # A surge pod cannot be placed when every replica needs its own node.
    want = {"maxSurge": 0, "maxUnavailable": 1} if mode == "required" else {"maxSurge": 1, "maxUnavailable": 0}
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": want}
    pdb = chart.one(objs, "PodDisruptionBudget", name(case, "control-plane"))
    assert pdb["spec"]["maxUnavailable"] == 1
    (c,) = chart.pod_spec(d)["containers"]
    args = chart.arg_map(c)
    assert args["source"] == "kube"
    if token_mode(case):
        assert args["node-identity"] == "token"
        sa = chart.one(objs, "ServiceAccount", name(case, "node-agent"))
        ns = sa["metadata"]["namespace"]
        assert args["node-agent-service-account"] == f"system:serviceaccount:{ns}:{sa['metadata']['name']}"
    else:
        # One certificate shared by every node agent: the role is checked, not the node.
        assert args["node-identity"] == "shared-certificate"


@pytest.mark.parametrize("case", CASES)
def test_dns_agents_and_service(case):
    values = chart.case_values(case).get("dns", {})
    objs = chart.objects(case)
    w = chart.by_component(objs, "dns-agent")
    assert w["kind"] == values.get("kind", "Deployment")
    svc = chart.one(objs, "Service", name(case, "dns"))
    assert svc["spec"].get("clusterIP") == values.get("service", {}).get("clusterIP")
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {(53, "UDP"), (53, "TCP")}
    kube_dns = values.get("kubeDnsLabels", False)
    assert (svc["metadata"]["labels"].get("k8s-app") == "kube-dns") == kube_dns
    assert (chart.pod_labels(w).get("k8s-app") == "kube-dns") == kube_dns
    pdbs = [p for p in chart.find(objs, "PodDisruptionBudget") if p["metadata"]["name"].endswith("dns-agent")]
    assert len(pdbs) == (1 if w["kind"] == "Deployment" else 0)
    if w["kind"] == "Deployment":
        assert "podAntiAffinity" in chart.pod_spec(w)["affinity"]


@pytest.mark.parametrize("case", CASES)
def test_otel_env_on_all_three_exactly_when_configured(case):
    endpoint = chart.case_values(case).get("otel", {}).get("endpoint")
    objs = chart.objects(case)
    for comp in COMPONENTS:
        (c,) = chart.pod_spec(chart.by_component(objs, comp))["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        if endpoint:
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
            assert env["OTEL_SERVICE_NAME"] == BINARY[comp]
        else:
            assert not any(k.startswith("OTEL_") for k in env), env


@pytest.mark.parametrize("case", CASES)
def test_identity_token_wiring(case):
    objs = chart.objects(case)
    ds = chart.by_component(objs, "node-agent")
    spec = chart.pod_spec(ds)
    (c,) = spec["containers"]
    args = chart.arg_map(c)
    projected = [v for v in spec["volumes"] if "projected" in v]
    if not token_mode(case):
        assert not projected and "identity-token-file" not in args
        return
    (vol,) = projected
    (src,) = vol["projected"]["sources"]
    sat = src["serviceAccountToken"]
    assert sat["audience"] == "meshlite"
    # The case's lifetime, else the chart's default (3600).
    want = chart.case_values(case).get("identity", {}).get("tokenExpirationSeconds", 3600)
    assert sat["expirationSeconds"] == want
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    assert args["identity-token-file"] == f"{mount['mountPath']}/{sat['path']}"
    # The DNS agent keeps its certificate identity.
    (dc,) = chart.pod_spec(chart.by_component(objs, "dns-agent"))["containers"]
    assert "identity-token-file" not in chart.arg_map(dc)


@pytest.mark.parametrize("case", CASES)
def test_every_mounted_secret_comes_from_the_chosen_tls_source(case):
    values = chart.case_values(case)
    objs = chart.objects(case)
    rendered_secrets = {s["metadata"]["name"] for s in chart.find(objs, "Secret")}
    cert_secrets = {c["spec"]["secretName"] for c in chart.find(objs, "Certificate")}
    existing = set(values.get("tls", {}).get("existingSecrets", {}).values())
    for comp in COMPONENTS:
        spec = chart.pod_spec(chart.by_component(objs, comp))
        (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        name = tls["secret"]["secretName"]
        if existing:
            assert name in existing and not rendered_secrets and not cert_secrets
        elif values.get("certManager", {}).get("enabled"):
            assert name in cert_secrets and not rendered_secrets
        else:
            assert name in rendered_secrets and not cert_secrets
        assert {i["key"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
        (c,) = spec["containers"]
        args = chart.arg_map(c)
        ca_flag = "tls-ca"
        assert (args["tls-cert"], args["tls-key"], args[ca_flag]) == (
            "/etc/meshlite/tls/tls.crt", "/etc/meshlite/tls/tls.key", "/etc/meshlite/tls/ca.crt")
        assert "insecure" not in args


@pytest.mark.parametrize("case", CASES)
def test_agents_dial_the_configured_endpoint(case):
    values = chart.case_values(case).get("controlPlane", {})
    objs = chart.objects(case)
    if values.get("endpoint"):
        want = values["endpoint"]
    elif values.get("service", {}).get("clusterIP"):
        want = f"https://{values['service']['clusterIP']}:9443"
    else:
        want = f"https://{name(case, 'control-plane')}.{chart.NAMESPACE}.svc:9443"
    for comp in ("node-agent", "dns-agent"):
        (c,) = chart.pod_spec(chart.by_component(objs, comp))["containers"]
        assert chart.arg_map(c)["control-plane"] == want


@pytest.mark.parametrize("case", CASES)
def test_service_monitor_scrapes_every_component(case):
    enabled = chart.case_values(case).get("metrics", {}).get("serviceMonitor", {}).get("enabled")
    objs = chart.objects(case)
    monitors = chart.find(objs, "ServiceMonitor")
    if not enabled:
        assert not monitors
        return
    (sm,) = monitors
    (svc,) = [s for s in chart.find(objs, "Service")
              if chart.selector_matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert svc["spec"]["clusterIP"] == "None"
    selected = {chart.component(w) for w in chart.meshlite_workloads(objs)
                if chart.selector_matches({"matchLabels": svc["spec"]["selector"]}, chart.pod_labels(w))}
    assert selected == set(COMPONENTS)
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]


@pytest.mark.parametrize("case", CASES)
def test_helm_test_hooks(case):
    enabled = chart.case_values(case).get("tests", {}).get("enabled", True)
    objs = chart.objects(case)
    hooks = [o for o in objs if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if not enabled:
        assert not hooks
        return
    assert sorted(h["metadata"]["name"] for h in hooks) == ["meshlite-test-clusterip", "meshlite-test-resolve"]
    for h in hooks:
        assert h["kind"] == "Pod" and h["spec"]["restartPolicy"] == "Never"
        assert h["spec"]["enableServiceLinks"] is True, "the script reads MESHLITE_DNS_SERVICE_HOST"
        script = h["spec"]["containers"][0]["args"][0]
        assert '"$MESHLITE_DNS_SERVICE_HOST"' in script and "nslookup" in script
    clusterip = chart.one(objs, "Pod", "meshlite-test-clusterip")["spec"]["containers"][0]["args"][0]
    assert "wget" in clusterip and "/readyz" in clusterip
