#!/usr/bin/env bash
# On the lent GPU machine (the device tool's `run`, carry [".whl"]): install the carried wheels
# into /tmp/site, then run one STEP, writing logs and results under $OUT.
#   bash bench/gpu/run.sh tests    # every @pytest.mark.gpu test (CuPy/JAX twins vs the CPU)
#   bash bench/gpu/run.sh metric   # issue 5: encoder train/embed cells/s, 2,000 and 28,231 genes
#   bash bench/gpu/run.sh mvae     # issue 6: multimodal VAE training cells/s
#   bash bench/gpu/run.sh kernels  # issues 2-4: rsvd, cca, inmf, integrate through the harness
# Each step is sized to end inside the tool's 600 s limit; see docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 SCATLAS_PROGRESS=0
out="${OUT:-/tmp/scatlas-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import jax, cupy; print('jax', jax.__version__, jax.devices()); \
print('cupy', cupy.__version__)" | tee -a "$out/device.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests 2>&1 \
      | tee "$out/pytest_gpu.log" ;;
  metric)
    python3 -m bench.metric --genes 2000,28231 --repeats 5 --warmup 2 --methods ours \
      --out "$out" 2>&1 | tee "$out/metric.log" ;;
  mvae)
    python3 -m bench.mvae --device gpu --sizes 100000 --out "$out" 2>&1 | tee "$out/mvae.log" ;;
  kernels)
    for name in rsvd cca inmf; do
      python3 -m bench run "$name" --device gpu --sizes 1e5 --repeats 3 --out "$out" 2>&1 \
        | tee "$out/$name.log"
    done ;;
  *) echo "unknown step: $1 (tests | metric | mvae | kernels)" >&2; exit 2 ;;
esac
