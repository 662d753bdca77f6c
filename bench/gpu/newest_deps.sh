#!/usr/bin/env bash
# Run scatlas's tests against the NEWEST numpy and JAX on PyPI, in a scratch venv (issue 17:
# the lent GPU machine's image runs newer numpy / JAX than CI; a version drift should show up
# here first, not as a crash in a 15-minute device session). Nothing in the checkout changes:
# scatlas is imported from the working tree (PYTHONPATH), not installed.
#
#   bash bench/gpu/newest_deps.sh                      # the whole suite (7+ min on 2 cores)
#   bash bench/gpu/newest_deps.sh tests/models/test_sparse_step.py tests/test_gpu_paths.py
#
# Environment: PYTHON (default: the first of python3.12, python3.13, python3 that runs; the
# newest numpy and JAX need Python >= 3.12, and the GPU image runs 3.12), VENV (default
# /tmp/scatlas-newest-deps), KEEP=1 reuses an existing venv (no download). Prints the versions
# obtained beside the newest on PyPI and, where they differ, why (the release needs a newer
# Python, or another requirement holds it back, as numba caps numpy): the suite then ran against
# the newest versions pip could install together. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-}
if [[ -z $py ]]; then
  for c in python3.12 python3.13 /root/.pyenv/versions/3.12*/bin/python3 python3; do
    if "$c" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then py=$c; break; fi
  done
fi
venv=${VENV:-/tmp/scatlas-newest-deps}
echo "python: $py ($("$py" --version 2>&1))"
if [[ ${KEEP:-0} != 1 || ! -x $venv/bin/python ]]; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # scatlas's own requirements (and the test extras), read from pyproject.toml
  mapfile -t reqs < <("$venv/bin/python" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)["project"]
extras = project["optional-dependencies"]
reqs = list(project["dependencies"])
for name in ("serve", "mudata", "harmony"):
    reqs += extras.get(name, [])
reqs += [r for r in extras.get("dev", []) if not r.startswith("scatlas")]
print("\n".join(dict.fromkeys(reqs)))
EOF
  )
  "$venv/bin/python" -m pip install -q "${reqs[@]}" numba
  "$venv/bin/python" -m pip install -q --upgrade numpy jax jaxlib
fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import json
import platform
import urllib.request

print("python", platform.python_version())
for name in ("numpy", "jax", "jaxlib", "scipy", "numba", "flax", "anndata", "scanpy"):
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = "not installed"
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=20) as r:
            info = json.load(r)["info"]
        newest, needs = info["version"], info.get("requires_python") or ""
    except Exception as exc:  # noqa: BLE001 - offline: report what is installed
        newest, needs = f"unknown ({type(exc).__name__})", ""
    note = ""
    if have != newest and not newest.startswith("unknown"):
        try:
            from packaging.specifiers import SpecifierSet

            fits = not needs or platform.python_version() in SpecifierSet(needs)
        except ImportError:
            fits = True
        note = ("   <- held back by another requirement" if fits else
                f"   <- the newest needs Python {needs}")
    print(f"{name:8s} installed {have:12s} newest on PyPI {newest}{note}")
EOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
