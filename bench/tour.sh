#!/usr/bin/env bash
# The first hour of a new user, from the CLI alone (issue 16): on synthetic data and on every real
# dataset in ../shared/data, run pca, integrate (every method, with --report), train metric, embed,
# index build, annotate and serve (a few curl requests), all at their defaults.
#
#   bash bench/tour.sh [WORKDIR]        # transcript on stdout; exits 1 if any step failed
#
# A step fails when its command exits non-zero or prints a Python traceback. Datasets without
# labels or batches skip the steps that need them (the transcript says so). Needs curl.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
data="${SCATLAS_TOUR_DATA:-$here/../shared/data}"
mkdir -p "$work"
failures=0

step() {  # step NAME CMD...: run it; show the last lines of its stderr; fail on rc or traceback
  local name="$1"; shift
  local log="$work/$name.log" t0=$SECONDS rc
  "$@" >"$log.out" 2>"$log"
  rc=$?
  if [[ $rc -ne 0 ]] || grep -q "Traceback (most recent call last)" "$log" "$log.out"; then
    echo "FAIL  $name (rc=$rc, $((SECONDS - t0))s): $*"
    tail -n 15 "$log" | sed 's/^/      /'
    failures=$((failures + 1))
    return 1
  fi
  echo "ok    $name ($((SECONDS - t0))s)"
  tr '\r' '\n' <"$log" | grep -v '^\s*$' | grep -v '%|' | tail -n 4 | sed 's/^/      /'
  return 0
}

request_bodies() {  # request_bodies EMB_H5AD RAW_H5AD LABEL DIR EXTRA: DIR/{search,annotate}.json
  python - "$@" <<'PY'
import json, sys
import anndata as ad
import numpy as np
emb, raw, label, out, extra = sys.argv[1:6]
a = ad.read_h5ad(emb)
with open(f"{out}/search.json", "w") as f:
    json.dump({"embeddings": np.asarray(a.obsm["X_scatlas"][:5]).tolist(), "k": 5}, f)
r = ad.read_h5ad(raw)[:5]
if "--use-raw" in extra:  # the service reads a request as the model's input kind
    r = r.raw.to_adata()
X = r.X.toarray() if hasattr(r.X, "toarray") else np.asarray(r.X)
with open(f"{out}/annotate.json", "w") as f:
    json.dump({"genes": list(map(str, r.var_names)), "counts": X.tolist(), "label_key": label}, f)
PY
}

serve_tour() {  # serve_tour NAME INDEX MODEL DIR (DIR holds search.json and annotate.json)
  local name="$1" index="$2" model="$3" dir="$4" port=$((18000 + RANDOM % 2000))
  scatlas serve --index "$index" --model "$model" --port "$port" >"$work/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  local url="http://127.0.0.1:$port" json='Content-Type: application/json'
  step "$name.health" curl -sf "$url/health"
  step "$name.search" curl -sf -X POST -H "$json" --data-binary @"$dir/search.json" "$url/search"
  step "$name.annotate" curl -sf -X POST -H "$json" --data-binary @"$dir/annotate.json" \
    "$url/annotate"
  local body code  # bad requests get a precise 4xx, never a 500
  for body in '{"embeddings": [[1, 2]], "k": 5}' '{"k": 5}' 'not json'; do
    code=$(curl -s -o "$work/$name.bad.json" -w '%{http_code}' -X POST -H "$json" \
      --data "$body" "$url/search")
    if [[ "$code" =~ ^4 ]]; then
      echo "ok    $name.bad-request $body -> $code $(head -c 160 "$work/$name.bad.json")"
    else
      echo "FAIL  $name.bad-request $body -> HTTP $code"; failures=$((failures + 1))
    fi
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  if grep -q "Traceback (most recent call last)" "$work/$name.log"; then
    echo "FAIL  $name: traceback in the service log"; failures=$((failures + 1))
  fi
}

tour() {  # tour NAME FILE LABEL BATCH [EXTRA train/embed flags for non-count data] [MVAE]
  local name="$1" file="$2" label="$3" batch="$4" extra="${5:-}" mvae="${6:-}" d="$work/$1"
  mkdir -p "$d"
  echo "== $name: $file (label: ${label:-none}, batch: ${batch:-none}${extra:+, $extra})"
  if [[ -z "$extra" ]]; then
    step "$name.pca" scatlas pca "$file" "$d/pca.h5ad" --normalize --n-top-genes 2000
  else
    step "$name.pca" scatlas pca "$file" "$d/pca.h5ad"
  fi
  if [[ -n "$batch" ]]; then
    for m in cca mnn inmf harmony; do
      step "$name.integrate-$m" scatlas integrate "$file" "$d/int_$m.h5ad" --method "$m" \
        --batch-key "$batch" --report "$d/report_$m" ${label:+--label-key "$label"}
    done
  else
    echo "skip  $name.integrate (no batch column)"
  fi
  if [[ -n "$mvae" ]]; then  # paired RNA + protein: the multimodal VAE, embed and impute
    step "$name.train-mvae" scatlas train mvae "$file" --out "$d/mvae" --plot "$d/mvae_loss.png" \
      && step "$name.embed-mvae" scatlas embed --model "$d/mvae" "$file" "$d/mvae_emb.h5ad" \
      && step "$name.impute" scatlas impute --model "$d/mvae" "$file" "$d/imputed.h5ad" \
        --target protein
  fi
  if [[ -z "$label" ]]; then echo "skip  $name.train/embed/index/annotate/serve (no labels)"; return; fi
  local study=()
  [[ -n "$batch" ]] && study=(--study-key "$batch")
  # shellcheck disable=SC2086
  step "$name.train-metric" scatlas train metric "$file" --out "$d/encoder" \
    --label-key "$label" "${study[@]}" --plot "$d/loss.png" $extra || return
  # the model recorded its input (kind, layer, .raw): embed, annotate, serve need no flag
  step "$name.embed" scatlas embed --model "$d/encoder" "$file" "$d/emb.h5ad" || return
  step "$name.index" scatlas index build "$d/emb.h5ad" --out "$d/index" || return
  step "$name.annotate" scatlas annotate --index "$d/index" --model "$d/encoder" "$file" \
    --label-key "$label" --out "$d/annotated.h5ad"
  request_bodies "$d/emb.h5ad" "$file" "$label" "$d" "$extra" && \
    serve_tour "$name.serve" "$d/index" "$d/encoder" "$d"
}

cd "$work" || exit 1
echo "# scatlas CLI tour, $(date -u +%FT%TZ), $(scatlas --version 2>&1), in $work"
step synthetic.make scatlas synthetic "$work/synthetic.h5ad" --n-cells 3000 --n-batches 3
tour synthetic "$work/synthetic.h5ad" cell_type batch
if [[ -d "$data" ]]; then
  tour cellbench "$data/cellbench_lung_celllines_5batch.h5ad" cell_line batch
  tour baron "$data/baron_pancreas_human_mouse_cider.h5ad" cell_type batch
  tour mesc "$data/scmerge_mesc_2batch.h5ad" cell_type batch
  tour eccite "$data/citefuse_eccite_cite_seq_500.h5ad" "" "" "" mvae
  tour pbmc68k "$data/scanpy_pbmc68k_reduced.h5ad" bulk_labels "" "--use-raw --input-kind lognorm"
else
  echo "skip  real datasets ($data is absent)"
fi
echo "# $failures failure(s)"
exit $((failures > 0))
