#!/usr/bin/env bash
# Download, here, the wheels that scatlas needs on the lent GPU machine and that its image lacks
# (Python 3.12 there; it has jax/jaxlib CUDA, flax, optax, orbax, cupy, numba, pandas, h5py,
# pyarrow, scikit-learn, matplotlib, tqdm, torch). About 30 MB, into .whl/ (git-ignored through
# .git/info/exclude). Then every device `run` names `.whl` in `carry` and starts with
# `bash bench/gpu/run.sh STEP` (see bench/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then  # .gitignore lists /.whl/ already
  gitdir="$(git rev-parse --git-dir)"
  mkdir -p "$gitdir/info" && echo '/.whl/' >> "$gitdir/info/exclude"
fi
mkdir -p .whl
WHEELS=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  scanpy==1.11.5 session-info2==0.4.1 scverse-misc==0.0.3 umap-learn==0.5.12
  pynndescent==0.7.0 faiss-cpu==1.15.1 starlette==1.10.0 uvicorn==0.54.0 mudata==0.3.10
)
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec"
done
du -sh .whl
