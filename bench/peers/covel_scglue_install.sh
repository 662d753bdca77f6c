#!/usr/bin/env bash
# Create the scglue peer venv used by ``python -m bench.covel`` (bench/covel.py).
#
#   bench/peers/covel_scglue_install.sh
#
# bench/.peers/scglue/ (gitignored) gets CPU-only torch (torch_venv.sh) and scglue 0.4.1 with its
# dependencies. Override the interpreter with PYTHON=..., the location with SCATLAS_PEERS_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
venv="$root/scglue"

echo "== scglue -> $venv"
# shellcheck source=torch_venv.sh
source "$here/peers/torch_venv.sh"
torch_venv "$venv"
"${pip[@]}" install --quiet "scglue==0.4.1" scikit-misc  # scikit-misc: seurat_v3 HVGs (tutorial)

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import scglue
import torch
print("torch", torch.__version__, "| scglue", md.version("scglue"))
PY
