#!/usr/bin/env bash
# On the lent GPU machine (the device tool's `run`, carry [".whl"]): install the carried wheels
# into /tmp/site, check that anndata/scanpy/faiss import and that CuPy and JAX see the GPU, then
# run the STEPs given, in order (one cold start and one install serve them all):
#   bash bench/gpu/run.sh tests metric mvae
#   tests    every @pytest.mark.gpu test (CuPy/JAX twins vs the CPU)
#   metric   issue 5: our encoder's train/embed cells/s at 2,000 and 28,231 genes
#   mvae     issue 6: our multimodal VAE's training cells/s at 100,000 cells
#   kernels  issues 2-4: our rsvd/pca, cca and inmf through the harness at 1e5 cells
# The tool brings back at most 8 files from $OUT, so this writes: device.txt (GPU, versions),
# run.log (every step's output, in order), the result JSON files (plain, written as each size
# ends, so they come back even when the call is cut off) and reports.tar.gz (the md/png tables).
# A failed step does not stop the next; the exit status is 1 when any step failed, 3 when the
# set-up or the preflight failed. See bench/gpu/README.md for a plan of calls.
set -euo pipefail
shopt -s nullglob
STEPS=(tests metric mvae kernels)
(($#)) || set -- tests
for step in "$@"; do
  [[ " ${STEPS[*]} " == *" $step "* ]] || {
    echo "unknown step: $step (${STEPS[*]})" >&2; exit 2; }
done
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/scatlas-gpu-out}"
extra="$(mktemp -d /tmp/scatlas-gpu-reports.XXXXXX)"  # md/png, packed into one archive
mkdir -p "$out"
log="$out/run.log"
say() { echo "=== $*" | tee -a "$log"; }

wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
  say "no wheels in .whl/: run bench/gpu/fetch_wheels.sh on the CPU side and carry [\".whl\"]"
  exit 3
fi
say "install ${#wheels[@]} wheels into /tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${wheels[@]}" 2>&1 | tee -a "$log" || { say "INSTALL FAILED"; exit 3; }
# anndata 0.12 declares pandas<3; under pandas 3 it writes the string obs index only with this.
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 SCATLAS_PROGRESS=0 \
  ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
  python3 - <<'EOF' || echo "version report failed"
import importlib, platform, warnings
warnings.simplefilter("ignore")  # anndata/scanpy deprecate __version__
print("python", platform.python_version())
for name in ("numpy", "pandas", "scipy", "sklearn", "numba", "jax", "jaxlib", "flax", "optax",
             "cupy", "anndata", "scanpy", "faiss", "zarr", "h5py"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__, exc)
try:
    import jax
    print("jax backend", jax.default_backend(), jax.devices())
except Exception as exc:  # noqa: BLE001
    print("jax devices unavailable:", type(exc).__name__, exc)
EOF
} 2>&1 | tee "$out/device.txt" | tee -a "$log"

say "preflight"
if ! python3 - <<'EOF' 2>&1 | tee -a "$log"; then
import anndata, scanpy, faiss, zarr, numba, jax  # noqa: F401
import cupy  # its own error (driver, CUDA runtime) shows here; gpu_available() would hide it
print("cupy sees", cupy.cuda.runtime.getDeviceCount(), "device(s)")
from scatlas import backend
assert backend.gpu_available(), "scatlas.backend.gpu_available() is False"
assert jax.default_backend() != "cpu", f"JAX runs on {jax.default_backend()!r}, not a GPU"
print("preflight ok:", backend.describe())
EOF
  say "PREFLIGHT FAILED: the GPU stack is not usable (see above); no step was run"
  exit 3
fi

run_step() {
  case "$1" in
    tests)  # a test may start a second CUDA JAX process: no process grabs 75 % of the memory
      XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu -q -p no:cacheprovider \
        -o addopts="" tests ;;
    metric)
      python3 -m bench.metric --genes 2000,28231 --repeats 5 --warmup 2 --methods ours \
        --out "$out" ;;
    mvae)
      python3 -m bench.mvae --device gpu --sizes 100000 --out "$out" ;;
    kernels)  # our methods only (the CPU baselines' times are in bench/results/*_cpu.json);
      local name rc=0  # CuPy's pool holds the memory here, should JAX start up as well
      for name in rsvd cca inmf; do
        XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m bench run "$name" --device gpu \
          --sizes 1e5 --repeats 3 --methods ours --no-report --out "$out" || rc=1
      done
      return "$rc" ;;
  esac
}

pack() {  # keep $OUT to device.txt, run.log, *.json and one archive of everything else
  local f moved=0
  for f in "$out"/*; do
    case "${f##*/}" in
      device.txt | run.log | reports.tar.gz | *.json) ;;
      *) mv -f "$f" "$extra/" && moved=1 ;;
    esac
  done
  if ((moved)); then
    tar -czf "$out/reports.tar.gz.part" -C "$extra" . && mv -f "$out/reports.tar.gz.part" \
      "$out/reports.tar.gz"
  fi
}

failed=()
for step in "$@"; do
  say "step $step: start $(date -u +%H:%M:%SZ)"
  start=$SECONDS
  status=ok
  run_step "$step" 2>&1 | tee -a "$log" || { status=FAILED; failed+=("$step"); }
  say "step $step: $status after $((SECONDS - start)) s"
  pack
done
files=("$out"/*)
((${#files[@]} <= 8)) || say "WARNING: ${#files[@]} files in \$OUT, only 8 come back"
if ((${#failed[@]})); then
  say "failed steps: ${failed[*]}"
  exit 1
fi
say "all steps ok: $*"
