#!/usr/bin/env bash
# Create the totalVI peer venv used by ``python -m bench.mvae`` (bench/mvae.py).
#
#   bench/peers/mvae_totalvi_install.sh
#
# bench/.peers/totalvi/ (gitignored) gets CPU-only torch and scvi-tools (with its dependencies:
# lightning, pyro-ppl, anndata, mudata, ...). torch: see torch_venv.sh (a local CPU wheel, the
# PyTorch CPU index, or PyPI without its CUDA wheels).
# Override the interpreter with PYTHON=/path/to/python3.11, the location with SCATLAS_PEERS_DIR,
# the scvi-tools requirement with SCVI_SPEC (default: scvi-tools, the newest release).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
venv="$root/totalvi"
spec="${SCVI_SPEC:-scvi-tools}"

echo "== totalvi -> $venv"
# shellcheck source=torch_venv.sh
source "$here/peers/torch_venv.sh"
torch_venv "$venv"
"${pip[@]}" install --quiet "$spec"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import scvi
import torch
print("torch", torch.__version__, "| scvi-tools", md.version("scvi-tools"))
PY
