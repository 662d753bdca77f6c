#!/usr/bin/env bash
# The lent GPU machine's runbook in ONE call (bench/gpu/README.md): the device tool's `run` with
#   command: bash bench/gpu/run.sh        carry: [".whl"]        timeout_s: 540
# installs the carried wheels, writes device.txt, probes what works (CuPy and JAX on the GPU,
# the optional packages), then runs the STEPs most valuable first, each only if what it needs
# is there (else "skipped", the others still run) and only if its minimum time still fits:
#   tests    the @pytest.mark.gpu tests, FILE BY FILE (one process each, a few at a time), so a
#            sticky CUDA fault or a hang fails one file, not the rest
#   kernels  issues 2-4: our rsvd/pca, cca and inmf at the sizes of bench/results/*_cpu.json
#   metric   issue 5: the encoder's train/embed cells/s at 2,000 and 28,231 genes
#   mvae     issue 6: the multimodal VAE's training cells/s at 100,000 cells
#   search   issue 7: 5e7 cells drawn on the GPU (bench/search.py --gen device --no-save: no
#            host data, nothing saved, ground truth of 1,000 queries by blocked GEMM there),
#            our native IVF on the GPU; 1e7 instead when less than SEARCH_BIG_MIN_S is left
#   bash bench/gpu/run.sh                  # all of them, in this order
#   bash bench/gpu/run.sh tests metric     # a selection, in the order given
# Time: BUDGET_S (default 500) seconds from the start, so that the summary is written before the
# tool's timeout_s (540) cuts the call; a step starts only when its minimum (MIN_S below) is
# left and runs under `timeout` of the rest (at most its MAX_S).
# $OUT (at most 8 files come back) gets, as each step ends (and every 20 s from a background
# copy): device.txt, run.log, summary.json (every step's and test file's status and seconds,
# failed benchmark methods), kernels_gpu.tar.gz (rsvd/cca/inmf JSON, md, png), metric_gpu.json,
# mvae_gpu.json, search_gpu.json: 7 files. Exit status: 0 when every step that ran passed, 1
# when one failed, 3 when the set-up failed or no step could run.
# STANDIN=1 (CPU only, for checking this script): the GPU probes pass without a GPU, the
# benchmarks run on the CPU at small sizes, the tests run as they would (skipped without a GPU).
# DISABLE="faiss jax_gpu ..." treats those capabilities as missing (leaves their steps out).
# Also: PARALLEL_TESTS (4 test files at a time), FILE_TIMEOUT_S (150 s per test file),
# SEARCH_BIG_MIN_S (180: seconds the search step needs left for 5e7 cells, else 1e7).
set -uo pipefail
shopt -s nullglob
ALL=(tests kernels metric mvae search)
declare -A MIN_S=([tests]=60 [kernels]=60 [metric]=60 [mvae]=45 [search]=60)
declare -A MAX_S=([tests]=180 [kernels]=150 [metric]=150 [mvae]=120 [search]=300)
declare -A NEEDS=([tests]="pytest cupy_gpu" [kernels]="cupy_gpu anndata"
                  [metric]="jax_gpu flax optax anndata" [mvae]="jax_gpu flax optax anndata"
                  [search]="cupy_gpu faiss")
(($#)) || set -- "${ALL[@]}"
for step in "$@"; do
  [[ -n ${MIN_S[$step]:-} ]] || { echo "unknown step: $step (${ALL[*]})" >&2; exit 2; }
done
cd "$(dirname "$0")/../.."
T0=$SECONDS
BUDGET_S=${BUDGET_S:-500}
PARALLEL_TESTS=${PARALLEL_TESTS:-4}   # test files at a time (one GPU, 16 cores)
FILE_TIMEOUT_S=${FILE_TIMEOUT_S:-150}
SEARCH_BIG_MIN_S=${SEARCH_BIG_MIN_S:-180}
STANDIN=${STANDIN:-0}
out="${OUT:-/tmp/scatlas-gpu-out}"
work="$(mktemp -d /tmp/scatlas-gpu-work.XXXXXX)"
mkdir -p "$out"
log="$out/run.log"
: > "$log"
say() { echo "=== [$((SECONDS - T0)) s] $*" | tee -a "$log"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
dev=gpu size_rsvd=1e5 size_cca=2e4 size_inmf=1e5 size_mvae=100000
size_search=5e7 size_search_small=1e7 sweep_search=128,256,512
genes=2000,28231
if [[ $STANDIN == 1 ]]; then
  dev=cpu size_rsvd=2000 size_cca=1000 size_inmf=2000 size_mvae=2000
  size_search=2e4 size_search_small=1e4 sweep_search=8,16
  genes=2000
fi

# -- set-up: the carried wheels, the device and versions ------------------------------------
wheels=(.whl/*.whl)
[[ $STANDIN == 1 ]] && wheels=()  # the CPU side's environment has them (and another Python)
if ((${#wheels[@]})); then
  say "install ${#wheels[@]} wheels into /tmp/site"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${wheels[@]}" >> "$log" 2>&1; then
    say "INSTALL FAILED (see above)"; exit 3
  fi
  export PYTHONPATH="/tmp/site:$PWD"
elif [[ $STANDIN != 1 ]]; then
  say "no wheels in .whl/: run bench/gpu/fetch_wheels.sh here first and carry [\".whl\"]"
  exit 3
else
  export PYTHONPATH="$PWD"
fi
# anndata 0.12 declares pandas<3; under pandas 3 it writes the string obs index only with this.
export PYTHONUNBUFFERED=1 SCATLAS_PROGRESS=0 ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS=1
# CuPy and JAX share the GPU in one process or several at once: JAX must not take 75 % of it
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
    || echo "nvidia-smi failed"
  timeout 120 python3 - <<'EOF' 2>&1 || echo "version report failed"
import importlib, platform, warnings
warnings.simplefilter("ignore")  # anndata/scanpy deprecate __version__
print("python", platform.python_version())
for name in ("numpy", "pandas", "scipy", "sklearn", "numba", "jax", "jaxlib", "flax", "optax",
             "cupy", "anndata", "scanpy", "faiss", "zarr", "h5py"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__, exc)
EOF
} > "$out/device.txt"
tee -a "$log" < "$out/device.txt"

# -- preflight: one probe per capability, each in its own process under a timeout -------------
declare -A CAP
probe() {  # probe NAME PYTHON-CODE
  local msg
  if [[ " ${DISABLE:-} " == *" $1 "* ]]; then CAP[$1]="missing: disabled by \$DISABLE"; return; fi
  if [[ $STANDIN == 1 && $1 == *_gpu ]]; then CAP[$1]="ok (stand-in: no GPU checked)"; return; fi
  if msg=$(timeout 90 python3 -c "$2" 2>&1); then CAP[$1]="ok ${msg##*$'\n'}"
  else CAP[$1]="missing: $(echo "$msg" | tail -n 1)"; fi
}
say "preflight"
probe pytest "import pytest"
probe anndata "import anndata, scanpy"
probe faiss "import faiss"
probe flax "import flax"
probe optax "import optax"
probe cupy_gpu "
import cupy
n = cupy.cuda.runtime.getDeviceCount()
assert int(cupy.arange(10).sum()) == 45
from scatlas import backend
assert backend.gpu_available(), 'scatlas.backend.gpu_available() is False'
print(n, 'device(s)')"
probe jax_gpu "
import jax, jax.numpy as jnp
assert jax.default_backend() != 'cpu', f'JAX runs on {jax.default_backend()!r}'
assert float(jnp.arange(10.0).sum()) == 45.0
print(jax.default_backend(), jax.devices())"
for cap in pytest anndata faiss flax optax cupy_gpu jax_gpu; do
  say "  $cap: ${CAP[$cap]}"
done

# -- results: copied into $OUT as they appear ---------------------------------------------------
sync_results() {
  local f files=()
  for f in "$work"/{metric,mvae,search}/*_"$dev".json; do
    cp -f "$f" "$out/.${f##*/}.part" && mv -f "$out/.${f##*/}.part" "$out/${f##*/}"
  done
  [[ -d $work/kernels ]] && files=("$work"/kernels/*)
  if ((${#files[@]})); then
    tar -czf "$out/.kernels.part" -C "$work/kernels" . 2>/dev/null \
      && mv -f "$out/.kernels.part" "$out/kernels_$dev.tar.gz"
  fi
}
(exec > /dev/null 2>&1  # holds no pipe of the caller; sleeps in short steps: quick to stop
 while :; do for _ in 1 2 3 4 5 6 7 8 9 10; do sleep 2; done; sync_results; done) &
syncer=$!
trap 'kill "$syncer" 2>/dev/null' EXIT

# -- summary.json: every step and test file, rewritten as each ends ------------------------------
: > "$work/steps.tsv"
: > "$work/tests.tsv"
write_summary() {
  python3 - "$work/steps.tsv" "$work/tests.tsv" "$out/summary.json" "$BUDGET_S" \
      "$((SECONDS - T0))" <<'EOF' || say "summary.json not written"
import json, sys
steps_tsv, tests_tsv, path, budget, elapsed = sys.argv[1:]
def rows(p):
    with open(p) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
summary = {"budget_s": int(budget), "elapsed_s": int(elapsed),
           "steps": [{"step": s, "status": st, "seconds": int(sec), "note": note}
                     for s, st, sec, note in rows(steps_tsv)],
           "test_files": [{"file": f, "status": st, "seconds": int(sec), "result": res}
                          for f, st, sec, res in rows(tests_tsv)]}
with open(path + ".part", "w") as fh:
    json.dump(summary, fh, indent=1)
import os
os.replace(path + ".part", path)
EOF
}
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$work/steps.tsv"; }

# -- the steps ----------------------------------------------------------------------------------
bench_check() {  # the runner's own check: a method that raised fails the step, named
  python3 -m bench.runner check "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}
run_tests() {  # $1: seconds allowed for the whole step
  local files=() f name rc status res sec deadline=$((SECONDS + $1)) failed=0 allow pids=()
  mkdir -p "$work/tests"
  while IFS= read -r f; do grep -q 'mark\.gpu' "$f" && files+=("$f"); done \
    < <(find tests -name 'test_*.py' | sort)
  say "tests: ${#files[@]} files with gpu tests, $PARALLEL_TESTS at a time, ${FILE_TIMEOUT_S} s each"
  for f in "${files[@]}"; do
    name=${f##*/}; name=${name%.py}
    while :; do  # a free slot: fewer than PARALLEL_TESTS of our files still running
      local running=0 pid
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=$((running + 1)); done
      ((running < PARALLEL_TESTS)) && break
      sleep 0.5
    done
    allow=$((deadline - SECONDS))
    if ((allow < 10)); then  # the step's time is up
      echo "not run (budget)" > "$work/tests/$name.log"
      echo 125 > "$work/tests/$name.rc"; echo 0 > "$work/tests/$name.sec"; continue
    fi
    ((allow > FILE_TIMEOUT_S)) && allow=$FILE_TIMEOUT_S
    (s=$SECONDS; timeout -k 5 "$allow" python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider \
       -o addopts="" "$f" > "$work/tests/$name.log" 2>&1
     echo $? > "$work/tests/$name.rc"; echo $((SECONDS - s)) > "$work/tests/$name.sec") &
    pids+=($!)
  done
  ((${#pids[@]})) && wait "${pids[@]}"
  for f in "${files[@]}"; do
    name=${f##*/}; name=${name%.py}
    rc=$(cat "$work/tests/$name.rc" 2>/dev/null || echo 125)
    sec=$(cat "$work/tests/$name.sec" 2>/dev/null || echo 0)
    res=$(grep -E '(passed|failed|skipped|error|no tests ran|deselected)' \
          "$work/tests/$name.log" 2>/dev/null | tail -n 1)
    case $rc in
      0|5) status=ok ;;  # 5: no gpu test selected in the file
      124|137) status="FAILED (timeout)"; failed=1 ;;
      125) status="not run (budget)" ;;
      *) status=FAILED; failed=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$sec" "${res:-no summary line}" \
      >> "$work/tests.tsv"
    { echo "--- $name: $status in $sec s: $res"; cat "$work/tests/$name.log"; } >> "$log"
    say "  $name: $status in $sec s ($res)"
  done
  return "$failed"
}
run_step() {  # $1 step, $2 seconds allowed
  local allow=$2 rc=0 name size
  case "$1" in
    tests) run_tests "$allow" ;;
    kernels)
      for name in rsvd cca inmf; do
        size=size_$name
        local t=$((allow - (SECONDS - step_t0)))
        ((t >= 20)) || { say "kernels: $name not run (budget)"; rc=1; break; }
        timeout -k 10 "$t" python3 -m bench run "$name" \
          --device "$dev" --sizes "${!size}" --repeats 3 --budget 30 --methods ours \
          --no-report --out "$work/kernels" >> "$log" 2>&1 || rc=1
        bench_check "$work/kernels/${name}_$dev.json" || rc=1
        sync_results
      done
      return "$rc" ;;
    metric)
      timeout -k 10 "$allow" python3 -m bench.metric --genes "$genes" --repeats 5 --warmup 2 \
        --methods ours --out "$work/metric" >> "$log" 2>&1 || rc=1
      bench_check "$work/metric/metric_$dev.json" || rc=1
      return "$rc" ;;
    mvae)
      timeout -k 10 "$allow" python3 -m bench.mvae --device "$dev" --sizes "$size_mvae" \
        --methods ours --out "$work/mvae" >> "$log" 2>&1 || rc=1
      bench_check "$work/mvae/mvae_$dev.json" || rc=1
      return "$rc" ;;
    search)  # data drawn on the device, nothing saved, exact ground truth there
      size=$size_search
      if ((allow < SEARCH_BIG_MIN_S)); then
        size=$size_search_small
        say "search: $allow s left (< SEARCH_BIG_MIN_S=$SEARCH_BIG_MIN_S): $size cells, not $size_search"
      fi
      timeout -k 10 "$allow" python3 -m bench.search --device "$dev" --sizes "$size" \
        --gen device --no-save --engine native-ivf --gt-queries 1000 --sweep "$sweep_search" \
        --hnsw-size 0 --raw-build-max 0 --native-max 0 --single 200 --exact-single 5 \
        --out "$work/search" >> "$log" 2>&1 ;;
  esac
}

failed=() skipped=() ran=0
for step in "$@"; do
  missing=()
  for cap in ${NEEDS[$step]}; do [[ ${CAP[$cap]} == ok* ]] || missing+=("$cap"); done
  if ((${#missing[@]})); then
    say "step $step: skipped: needs ${missing[*]}"
    skipped+=("$step"); record "$step" "skipped" 0 "needs ${missing[*]}"; write_summary
    continue
  fi
  remaining=$(left)
  if ((remaining < MIN_S[$step])); then
    say "step $step: not run: ${remaining} s left, it needs at least ${MIN_S[$step]} s"
    skipped+=("$step"); record "$step" "not run (budget)" 0 "${remaining} s left"
    write_summary; continue
  fi
  allow=$remaining; ((allow > MAX_S[$step])) && allow=${MAX_S[$step]}
  say "step $step: start (up to $allow s)"
  step_t0=$SECONDS; mkdir -p "$work/$step"
  if run_step "$step" "$allow"; then status=ok; else status=FAILED; failed+=("$step"); fi
  ran=1
  say "step $step: $status after $((SECONDS - step_t0)) s"
  record "$step" "$status" $((SECONDS - step_t0)) ""
  sync_results; write_summary
done
kill "$syncer" 2>/dev/null; wait "$syncer" 2>/dev/null
sync_results; write_summary
files=("$out"/*)
((${#files[@]} <= 8)) || say "WARNING: ${#files[@]} files in \$OUT, only 8 come back"
((${#skipped[@]})) && say "skipped or not run: ${skipped[*]}"
if ((!ran)); then say "NO STEP RAN"; exit 3; fi
if ((${#failed[@]})); then say "FAILED steps: ${failed[*]}"; exit 1; fi
say "all steps that ran passed: $* (in $((SECONDS - T0)) s)"
