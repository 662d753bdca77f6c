#!/usr/bin/env bash
# Create the totalVI peer venv used by ``python -m bench.mvae`` (bench/mvae.py).
#
#   bench/peers/mvae_totalvi_install.sh
#
# bench/.peers/totalvi/ (gitignored) gets CPU-only torch and scvi-tools (with its dependencies:
# lightning, pyro-ppl, anndata, mudata, ...). torch, first match wins: $SCATLAS_TORCH_WHEEL, a
# local CPU wheel (/opt/wheels/torch-*+cpu-*.whl), the PyTorch CPU index, PyPI.
# Override the interpreter with PYTHON=/path/to/python3.11, the location with SCATLAS_PEERS_DIR,
# the scvi-tools requirement with SCVI_SPEC (default: scvi-tools, the newest release).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
py="${PYTHON:-python3}"
venv="$root/totalvi"
spec="${SCVI_SPEC:-scvi-tools}"

echo "== totalvi -> $venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

wheel="${SCATLAS_TORCH_WHEEL:-}"
if [ -z "$wheel" ]; then
    wheel="$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
fi
if [ -n "$wheel" ]; then
    echo "   torch from local wheel $wheel"
    "${pip[@]}" install --quiet "$wheel"
elif "${pip[@]}" install --quiet torch --index-url https://download.pytorch.org/whl/cpu; then
    echo "   torch from the PyTorch CPU index"
else
    "${pip[@]}" install --quiet torch
fi
"${pip[@]}" install --quiet "$spec"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import scvi
import torch
print("torch", torch.__version__, "| scvi-tools", md.version("scvi-tools"))
PY
