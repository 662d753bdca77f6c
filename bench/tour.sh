#!/usr/bin/env bash
# The first hour of a new user, from the CLI alone (issue 16): on synthetic data and on every real
# dataset in ../shared/data, run pca, integrate (every method, with --report), train metric, embed,
# index build, annotate and serve (a few curl requests), all at their defaults.
#
#   bash bench/tour.sh [WORKDIR]        # transcript on stdout; exits non-zero on the first failure
#
# A step fails when its command exits non-zero or prints a Python traceback. Datasets without
# labels or batches skip the steps that need them (said in the transcript). Needs curl for serve.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
data="${SCATLAS_TOUR_DATA:-$here/../shared/data}"
mkdir -p "$work"
failures=0

step() {  # step NAME CMD...: run, show its stderr tail, fail on non-zero or a traceback
  local name="$1"; shift
  local log="$work/$name.log"
  local t0=$SECONDS
  "$@" >"$log.out" 2>"$log"
  local rc=$?
  local dt=$((SECONDS - t0))
  if [[ $rc -ne 0 ]] || grep -q "Traceback (most recent call last)" "$log" "$log.out"; then
    echo "FAIL  $name (rc=$rc, ${dt}s): $*"
    tail -n 15 "$log" | sed 's/^/      /'
    failures=$((failures + 1))
    return 1
  fi
  echo "ok    $name (${dt}s)"
  grep -v '^\s*$' "$log" | grep -iv 'it/s\]\|s/it\]\|%|' | tail -n 3 | sed 's/^/      /'
  return 0
}

serve_tour() {  # serve_tour NAME INDEX MODEL QUERY_JSON
  local name="$1" index="$2" model="$3" port=$((18000 + RANDOM % 2000))
  scatlas serve --index "$index" ${model:+--model "$model"} --port "$port" \
    >"$work/$name.serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  step "$name.health" curl -sf "http://127.0.0.1:$port/health"
  step "$name.search" curl -sf -X POST -H 'Content-Type: application/json' \
    --data-binary @"$4" "http://127.0.0.1:$port/search"
  # a bad request must be a precise 4xx, never a 500
  local code
  code=$(curl -s -o "$work/$name.bad.json" -w '%{http_code}' -X POST \
    -H 'Content-Type: application/json' --data '{"vectors": [[1, 2]], "k": 5}' \
    "http://127.0.0.1:$port/search")
  if [[ "$code" =~ ^4 ]]; then echo "ok    $name.bad-request ($code: $(head -c 160 "$work/$name.bad.json"))"
  else echo "FAIL  $name.bad-request: HTTP $code"; failures=$((failures + 1)); fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  if grep -q "Traceback (most recent call last)" "$work/$name.serve.log"; then
    echo "FAIL  $name.serve: traceback in the service log"; failures=$((failures + 1))
  fi
}

query_json() {  # query_json H5AD OBSM_KEY OUT: the first 5 cells' embeddings as a /search body
  python - "$1" "$2" "$3" <<'PY'
import json, sys
import anndata as ad
a = ad.read_h5ad(sys.argv[1])
json.dump({"vectors": a.obsm[sys.argv[2]][:5].tolist(), "k": 5}, open(sys.argv[3], "w"))
PY
}

tour() {  # tour NAME FILE LABEL BATCH
  local name="$1" file="$2" label="$3" batch="$4" d="$work/$1"
  mkdir -p "$d"
  echo "== $name: $file (label: ${label:-none}, batch: ${batch:-none})"
  step "$name.pca" scatlas pca "$file" "$d/pca.h5ad" --normalize --n-top-genes 2000
  if [[ -n "$batch" ]]; then
    for m in cca mnn inmf harmony; do
      step "$name.integrate-$m" scatlas integrate "$file" "$d/int_$m.h5ad" --method "$m" \
        --batch-key "$batch" --report "$d/report_$m" ${label:+--label-key "$label"}
    done
  else
    echo "skip  $name.integrate (no batch column)"
  fi
  if [[ -z "$label" ]]; then echo "skip  $name.train/annotate (no label column)"; return; fi
  local heldout="" study=""
  [[ -n "$batch" ]] && study="--study-key $batch"
  step "$name.train-metric" scatlas train metric "$file" --out "$d/encoder" \
    --label-key "$label" $study --plot "$d/loss.png" || return
  step "$name.embed" scatlas embed --model "$d/encoder" "$file" "$d/emb.h5ad" || return
  step "$name.index" scatlas index build "$d/emb.h5ad" --out "$d/index" || return
  step "$name.annotate" scatlas annotate --index "$d/index" --model "$d/encoder" "$file" \
    --label-key "$label" --out "$d/annotated.h5ad"
  query_json "$d/emb.h5ad" X_scatlas "$d/query.json" && \
    serve_tour "$name.serve" "$d/index" "$d/encoder" "$d/query.json"
}

cd "$work"
echo "# scatlas CLI tour, $(date -u +%FT%TZ), $(scatlas --version 2>&1), work dir $work"
step synthetic.make scatlas synthetic "$work/synthetic.h5ad" --n-cells 3000 --n-batches 3
tour synthetic "$work/synthetic.h5ad" cell_type batch
if [[ -d "$data" ]]; then
  tour cellbench "$data/cellbench_lung_celllines_5batch.h5ad" cell_line batch
  tour baron "$data/baron_pancreas_human_mouse_cider.h5ad" cell_type batch
  tour mesc "$data/scmerge_mesc_2batch.h5ad" cell_type batch
  tour eccite "$data/citefuse_eccite_cite_seq_500.h5ad" "" ""
  tour pbmc68k "$data/scanpy_pbmc68k_reduced.h5ad" bulk_labels ""
else
  echo "skip  real datasets ($data is absent)"
fi
echo "# $failures failure(s)"
exit $((failures > 0))
