"""The rendered flags and env are accepted by the real binaries, so the chart and the
programs cannot drift apart.

Each meshlite container of every values case is run as
`<binary> <rendered args...> --check-config` with the container's env: literal values as
rendered, downward-API values replaced by placeholders (the node name becomes `node-1`),
and `$(VAR)` references in args expanded the way kubelet does. `--check-config` parses and
validates flags and env, prints the effective config and exits 0 (64 when invalid) without
reading certificate files or starting anything.

Binaries come from $MESHLITE_BIN_DIR; when it is unset they are built with cargo from the
repository root into target/debug. A missing binary or a rejected flag fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import chart

PACKAGES = ("meshlite-control-plane", "meshlite-node-agent", "meshlite-dns-agent")
NODE_NAME = "node-1"
FIELD_PLACEHOLDERS = {
    "spec.nodeName": NODE_NAME,
    "metadata.name": "meshlite-pod-1",
    "metadata.namespace": chart.NAMESPACE,
    "status.podIP": "198.18.1.1",
    "status.hostIP": "198.18.0.1",
}
INVALID_CONFIG = 64
# A value each binary must refuse, to prove --check-config validates rather than ignores.
REFUSED = {
    "meshlite-control-plane": "--source=bogus",
    "meshlite-node-agent": "--mode=userspace",
    "meshlite-dns-agent": "--pod-records=bogus",
}


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    configured = os.environ.get("MESHLITE_BIN_DIR")
    if configured:
        return Path(configured)
    cmd = ["cargo", "build"]
    for p in PACKAGES:
        cmd += ["-p", p]
    try:
        proc = subprocess.run(cmd, cwd=chart.REPO, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        pytest.fail("MESHLITE_BIN_DIR is unset and cargo is not installed to build the binaries")
    if proc.returncode != 0:
        pytest.fail(f"MESHLITE_BIN_DIR is unset and `{' '.join(cmd)}` failed:\n{proc.stderr[-4000:]}")
    return chart.REPO / "target" / "debug"


def container_env(container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in FIELD_PLACEHOLDERS, f"no placeholder for fieldRef {path}"
            env[e["name"]] = FIELD_PLACEHOLDERS[path]
        else:
            raise AssertionError(f"env {e['name']}: only literal and fieldRef values are supported here")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet's $(VAR) expansion: defined variables are substituted, $$ escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def meshlite_containers() -> list[tuple[str, str, dict]]:
    out = []
    for case in chart.CASES:
        for w in chart.meshlite_workloads(chart.objects(case)):
            for c in chart.containers(w):
                out.append((case, c["name"], c))
    return out


CONTAINERS = meshlite_containers()


def run_check_config(bin_dir: Path, container: dict, extra: list[str] | None = None) -> tuple[str, subprocess.CompletedProcess]:
    command = container["command"]
    assert len(command) == 1, f"command should be just the binary, got {command}"
    name = os.path.basename(command[0])
    binary = bin_dir / name
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"binary {name} not found in {bin_dir} (MESHLITE_BIN_DIR); "
                    f"build it with `cargo build -p {name}`")
    env = container_env(container)
    args = [expand(a, env) for a in container.get("args", [])]
    # Only the container's env: nothing from the test's own environment leaks in.
    full_env = {"PATH": "/usr/bin:/bin", **env}
    proc = subprocess.run([str(binary), *args, *(extra or []), "--check-config"],
                          capture_output=True, text=True, env=full_env, timeout=60, cwd="/")
    return name, proc


@pytest.mark.parametrize("case,name,container", CONTAINERS,
                         ids=[f"{case}-{name}" for case, name, _ in CONTAINERS])
def test_rendered_flags_and_env_are_accepted_by_the_real_binaries(bin_dir, case, name, container):
    binary, proc = run_check_config(bin_dir, container)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{binary} rejected the chart's configuration for values case {case!r} "
        f"(exit {proc.returncode}).\nargs: {container.get('args')}\n"
        f"env: {[e['name'] for e in container.get('env', [])]}\noutput:\n{out[-4000:]}")
    if any(e["name"] == "MESHLITE_NODE_NAME" for e in container.get("env", [])):
        assert NODE_NAME in out, f"{binary}: the effective config does not show the node name from env:\n{out}"


@pytest.mark.parametrize("name", PACKAGES)
def test_check_config_refuses_invalid_values(bin_dir, name):
    """Guards the test above: a binary that ignored its flags would pass it."""
    _, _, container = next(c for c in CONTAINERS if c[0] == "default" and c[2]["command"] == [name])
    flag = REFUSED[name].split("=", 1)[0] + "="
    bad = dict(container, args=[a for a in container["args"] if not a.startswith(flag)] + [REFUSED[name]])
    binary, proc = run_check_config(bin_dir, bad)
    assert proc.returncode == INVALID_CONFIG, (
        f"{binary} {REFUSED[name]} --check-config exited {proc.returncode}, want {INVALID_CONFIG} "
        f"(invalid config):\n{(proc.stdout + proc.stderr)[-2000:]}")
    binary, proc = run_check_config(bin_dir, container, ["--no-such-flag-for-meshlite"])
    assert proc.returncode == INVALID_CONFIG, (
        f"{binary} with an unknown flag exited {proc.returncode}, want {INVALID_CONFIG}:\n"
        f"{(proc.stdout + proc.stderr)[-2000:]}")
