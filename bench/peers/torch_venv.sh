# Sourced by the peer installers that need torch (scimilarity_install.sh, mvae_totalvi_install.sh).
#
#   torch_venv VENV   creates the venv VENV with an up-to-date pip and CPU-only torch, and sets
#                     the array `pip` to VENV's pip command.
#
# torch, first match wins:
#   1. $SCATLAS_TORCH_WHEEL, or a local CPU wheel (/opt/wheels/torch-*+cpu-*.whl);
#   2. the PyTorch CPU index (https://download.pytorch.org/whl/cpu), when reachable;
#   3. the PyPI wheel with --no-deps plus its pure-Python deps (skips the multi-GB CUDA wheels;
#      the PyPI build runs on the CPU without them).
# The interpreter is $PYTHON (default python3).

torch_venv() {
    local venv="$1" wheel
    "${PYTHON:-python3}" -m venv "$venv"
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
        "${pip[@]}" install --quiet filelock typing-extensions sympy networkx jinja2 fsspec
    fi
}
