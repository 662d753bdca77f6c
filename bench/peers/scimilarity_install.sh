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
# torch, first match wins:
#   1. $SCATLAS_TORCH_WHEEL, or a local CPU wheel (/opt/wheels/torch-*+cpu-*.whl);
#   2. the PyTorch CPU index (https://download.pytorch.org/whl/cpu), when reachable;
#   3. the PyPI wheel with --no-deps plus its pure-Python deps (skips the multi-GB CUDA wheels;
#      the PyPI build runs on the CPU without them).
# Override the interpreter with PYTHON=/path/to/python3.11, the location with SCATLAS_PEERS_DIR.
# bench/metric.py finds the venv there, or via SCATLAS_PEER_PYTHON_SCIMILARITY.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
py="${PYTHON:-python3}"
venv="$root/scimilarity"
scimilarity_version="${SCIMILARITY_VERSION:-0.4.1}"
torch_deps=(filelock typing-extensions sympy networkx jinja2 fsspec)

echo "== scimilarity -> $venv"
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
    echo "   torch from PyPI without its CUDA dependencies"
    "${pip[@]}" install --quiet --no-deps torch
    "${pip[@]}" install --quiet "${torch_deps[@]}"
fi

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
