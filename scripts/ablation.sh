#!/usr/bin/env bash
# The ablation of docs/RESULTS.md, like the paper's: each variant is
# optimized from the shared ResNet-50 and measured — params, MACs, file size,
# tract latency at batch 1 (1 and 2 threads), top-1/top-5 on the 744
# imagenet-1k-sample images not used for calibration or training
# (`check --skip 256`), zero-shot Animals-10 accuracy, optimize time.
# Calibration: the first 256 images (sorted by path) of imagenet-1k-sample;
# distillation: those plus unlabelled-photos (a seeded 10 % is held out to
# pick the best epoch). Nothing is tuned on the 744 evaluation images.
#
# Usage: scripts/ablation.sh [NAME …]       (default: every variant below)
#   EPOCHS=N  distillation epochs of the *-distill variants (default 2)
#   RECIPE_EPOCHS=N  epochs of the `cresnet` recipe row (default: the recipe's)
#   REUSE=1  keep an existing OUT/NAME.onnx + report (optimize time = the report's pass times)
# Appends one JSON line per variant to docs/ablation.jsonl; render with
# `python3 scripts/results.py` (docs/RESULTS.md tables, docs/*.svg plots).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(realpath "${SHARED:-../shared}")
MODEL=$SHARED/models/resnet50-imagenet.onnx
DATA=$SHARED/data/imagenet-1k-sample
CLASSES=$SHARED/data/imagenet-1k-classes.txt
OUT=${OUT:-target/ablation}
EPOCHS=${EPOCHS:-2}
BIN=target/release/cresnet-opt
mkdir -p "$OUT" docs
cargo build --release --quiet
CAL="calibration: { data: $DATA, images: 256, extra: [{dir: $SHARED/data/unlabelled-photos}] }"
DISTILL="{distill: {epochs: $EPOCHS}}"
PRUNE="{prune: {target_params: 0.192}}"   # matches prune+dw's params (4.90 M)
PRUNE_DW="{prune: {target_params: 0.3}}, {dw: {rank: 1}}, fold"
# lowrank (1x1 convs and the classifier, half of the rank budget each) then dw rank 1: 19.8 %.
LR_DW="{lowrank: {ratio: 0.265}}, {dw: {rank: 1}}"
# The recipe's split (session 5): the first two stages (56x56, 28x28) keep more
# (lowrank ratio 0.6, dw rank 2), the last two less (ratio 0.2445): 5,124,268 weights.
SPLIT='{lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.2445, max_resolution: 14}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}'
# The lr-dw and split rows refit on 1,256 images (the 256 plus all unlabelled photos).
CAL_X="calibration: { data: $DATA, images: 256, extra: [{dir: $SHARED/data/unlabelled-photos}], refit_extra: 1000 }"

declare -A PASSES=(
  [original]="[]"
  [fold]="[fold]"
  [prune-free]="[fold, $PRUNE]"
  [prune-cal]="[fold, $PRUNE]"
  [prune-distill]="[fold, $PRUNE, $DISTILL]"
  [dw-free]="[fold, {dw: {rank: 1}}, fold]"
  [dw-cal]="[fold, {dw: {rank: 1}}, fold]"
  [dw-distill]="[fold, {dw: {rank: 1}}, fold, $DISTILL]"
  [prune-dw-free]="[fold, $PRUNE_DW]"
  [prune-dw-cal]="[fold, $PRUNE_DW]"
  [prune-dw-distill]="[fold, $PRUNE_DW, $DISTILL]"
  [lr-dw-free]="[fold, $LR_DW]"
  [lr-dw-cal]="[fold, $LR_DW]"
  # Distills the calibrated lr-dw-cal output (run that first): the teacher is the original.
  [lr-dw-distill]="[{distill: {epochs: $EPOCHS, teacher: $MODEL}}]"
  [split-free]="[fold, $SPLIT]"
  [split-cal]="[fold, $SPLIT]"
  # Distills the calibrated split-cal output (run that first): the teacher is the original.
  [split-distill]="[{distill: {epochs: $EPOCHS, teacher: $MODEL}}]"
)
ORDER="cresnet original fold prune-dw-free prune-dw-cal prune-free prune-cal dw-free dw-cal lr-dw-free lr-dw-cal split-free split-cal prune-distill dw-distill prune-dw-distill lr-dw-distill split-distill"
for name in ${@:-$ORDER}; do
  cfg=$OUT/$name.yaml
  if [[ $name == cresnet ]]; then
    echo "pipeline: cresnet" > "$cfg"
    [[ -n ${RECIPE_EPOCHS:-} ]] && { sed -n '/^passes:/,$p' passes/cresnet.yaml | sed "s/epochs: [0-9]*/epochs: $RECIPE_EPOCHS/" >> "$cfg"; sed -i '1d' "$cfg"; }
  else
    echo "passes: ${PASSES[$name]}" > "$cfg"
  fi
  if [[ $name == lr-dw-cal || $name == split-cal ]]; then echo "$CAL_X" >> "$cfg"
  elif [[ $name != *-free && $name != original && $name != fold ]]; then echo "$CAL" >> "$cfg"; fi
  start=$(date +%s.%N)
  input=$MODEL
  [[ $name == lr-dw-distill ]] && input=$OUT/lr-dw-cal.onnx
  [[ $name == split-distill ]] && input=$OUT/split-cal.onnx
  if [[ -n ${REUSE:-} && -f $OUT/$name.onnx && -f $OUT/$name.report.json ]]; then
    start=$(echo "$start - $(python3 -c 'import json,sys; print(sum(p["seconds"] for p in json.load(open(sys.argv[1]))["passes"]))' "$OUT/$name.report.json")" | bc)
  elif [[ $name == original ]]; then cp "$MODEL" "$OUT/$name.onnx"; echo '{"params_after": 25636712, "macs_after": 3857973248}' > "$OUT/$name.report.json"
  else $BIN "$input" -o "$OUT/$name.onnx" --config "$cfg" --report "$OUT/$name.report.json" --quiet 2> "$OUT/$name.log"; fi
  opt_s=$(echo "$(date +%s.%N) - $start" | bc)
  $BIN check "$OUT/$name.onnx" --data "$DATA" --classes "$CLASSES" --skip 256 --format json --quiet > "$OUT/$name.check.json"
  $BIN check "$OUT/$name.onnx" --data "$SHARED/data/animals10-sample" --label-map "$SHARED/data/animals10-imagenet-map.yaml" --format json --quiet > "$OUT/$name.animals.json"
  $BIN bench "$OUT/$name.onnx" --threads 1,2 --runs 10 --json > "$OUT/$name.bench.json"
  python3 - "$name" "$OUT" "$opt_s" <<'PY' | tee -a docs/ablation.jsonl
import json, os, sys
name, out, opt_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
load = lambda kind: json.load(open(f"{out}/{name}.{kind}.json"))
r, c, a, b = load("report"), load("check"), load("animals"), load("bench")
print(json.dumps({"name": name, "params": r["params_after"], "macs": r["macs_after"],
  "file_mb": round(os.path.getsize(f"{out}/{name}.onnx") / 1e6, 1),
  "latency_ms_1t": round(b[0]["median_ms"], 1), "latency_ms_2t": round(b[1]["median_ms"], 1),
  "top1": c["model"]["top1"], "top5": c["model"]["top5"], "images": c["images"],
  "animals_top1": a["model"]["top1"], "optimize_s": round(opt_s, 1),
  "distill_log": [p["changed"] for p in r.get("passes", []) if p["pass"] == "distill"]}))
PY
done
# Per-stage weights of the recipe's output against the original (docs/stages.svg).
# split-distill is the recipe's pipeline run in two steps (calibrate, then distill).
for recipe in cresnet split-distill; do
  if [[ -f $OUT/$recipe.onnx ]]; then $BIN stats "$MODEL" "$OUT/$recipe.onnx" --format json > docs/stages.json; break; fi
done
python3 scripts/results.py
