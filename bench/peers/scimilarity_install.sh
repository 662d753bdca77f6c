#!/usr/bin/env bash
# Create the SCimilarity peer venv used by ``python -m bench.metric`` (bench/metric.py).
#
#   bench/peers/scimilarity_install.sh        # or: python -m bench.metric --install
#
# bench/.peers/scimilarity/ (gitignored) gets CPU-only torch and SCimilarity's own code, nothing
# else of SCimilarity's dependency list: the runner (bench/peers/scimilarity_runner.py) imports
# only scimilarity.nn_models, .ontologies and .triplet_selector, which need torch, numpy,
# networkx (comes with torch), pandas and obonet. scimilarity itself is installed with --no-deps
# (its full list pulls pytorch-lightning, tiledb, tiledb-vector-search, hnswlib, captum, zarr,
# scanpy).
#
# torch: see torch_venv.sh (a local CPU wheel, the PyTorch CPU index, or PyPI without CUDA).
# Override the interpreter with PYTHON=/path/to/python3.11, the location with SCATLAS_PEERS_DIR.
# bench/metric.py finds the venv there, or via SCATLAS_PEER_PYTHON_SCIMILARITY.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
venv="$root/scimilarity"
scimilarity_version="${SCIMILARITY_VERSION:-0.4.1}"

echo "== scimilarity -> $venv"
# shellcheck source=torch_venv.sh
source "$here/peers/torch_venv.sh"
torch_venv "$venv"

"${pip[@]}" install --quiet numpy scipy pandas obonet
"${pip[@]}" install --quiet --no-deps "scimilarity==$scimilarity_version"

"$venv/bin/python" - <<'EOF'
import torch
assert (torch.randn(2, 2) @ torch.randn(2, 2)).shape == (2, 2)
import importlib.metadata as md
print("torch", torch.__version__, "| scimilarity", md.version("scimilarity"))
EOF
"$venv/bin/python" "$here/peers/scimilarity_runner.py" selftest \
    --params '{"batch_size": 24, "n_labels": 5, "n_studies": 3}' > /dev/null
echo "   selftest ok"
