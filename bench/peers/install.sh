#!/usr/bin/env bash
# Create the isolated peer virtual environments used by ``python -m bench run inmf``.
#
#   bench/peers/install.sh            # both peers
#   bench/peers/install.sh pyplanc    # only pyplanc
#   bench/peers/install.sh pyliger    # only pyliger
#
# Each peer lives in its own venv under bench/.peers/<name>/ (gitignored) because
# pyplanc pins numpy down and pyliger drags in numba/plotting stacks that must not
# touch the main .venv.  Override the interpreter with PYTHON=/path/to/python3.11.
# bench/inmf.py finds them there, or via SCATLAS_PEER_PYTHON_PYPLANC /
# SCATLAS_PEER_PYTHON_PYLIGER.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${SCATLAS_PEERS_DIR:-$here/.peers}"
py="${PYTHON:-python3}"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(pyplanc pyliger)

install_peer() {
    local name="$1"; shift
    local venv="$root/$name"
    echo "== $name -> $venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$@"
    "$venv/bin/python" -c "import $name; print('$name', getattr($name, '__version__', '?'))"
}

for p in "${peers[@]}"; do
    case "$p" in
        pyplanc) install_peer pyplanc "pyplanc==0.0.2" scipy ;;
        # setuptools<81: h5sparse (a pyliger dep) imports pkg_resources.
        pyliger) install_peer pyliger "pyliger==0.2.4" "setuptools<81" ;;
        *) echo "unknown peer: $p (pyplanc|pyliger)" >&2; exit 2 ;;
    esac
done
