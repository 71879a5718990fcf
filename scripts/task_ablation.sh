#!/usr/bin/env bash
# The task-model ablation of docs/RESULTS.md ("Task model", issue #17), like
# the paper's: the shared ImageNet ResNet-50 is retargeted to intel-scenes'
# 6 classes (the task model), then each variant is optimized from the task
# model and measured — params, MACs, file size, tract latency at batch 1
# (1 and 2 threads), top-1 on intel-scenes/test, optimize wall time and peak
# memory (/usr/bin/time -v). Everything trains, calibrates and selects on
# intel-scenes/train only; test/ is only scored.
#
# Usage: scripts/task_ablation.sh [NAME …]   (default: every variant below)
#   REUSE=1  keep an existing OUT/NAME.onnx + report + time (re-measure only)
# Appends one JSON line per variant to docs/task-ablation.jsonl.
# The distilled rows (*-distill) take ~45 min each on 2 cores; cresnet-task
# and cresnet-task-4.08m ~9 min; the others 1–6 min. The hand-written rows
# refit on the built-in 256 calibration photos; the two cresnet-task rows on
# the recipe's 512 (its `calibration_defaults`), as a user runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(realpath "${SHARED:-../shared}")
TRAIN=$SHARED/data/intel-scenes/train
TEST=$SHARED/data/intel-scenes/test
CLASSES=$SHARED/data/intel-scenes/classes.txt
OUT=${OUT:-target/task-ablation}
BIN=target/release/cresnet-opt
mkdir -p "$OUT" docs
cargo build --release --quiet
TASK=$OUT/task.onnx
if [[ ! -f $TASK ]]; then
  /usr/bin/time -v $BIN retarget "$SHARED/models/resnet50-imagenet.onnx" --data "$TRAIN" --classes "$CLASSES" -o "$TASK" \
    --report "$OUT/task.report.json" 2> "$OUT/task.log"
fi
CAL="calibration: { data: $TRAIN, classes: $CLASSES }"
# The training of the pruning recipe (docs/task-prune-train.yaml), cresnet-task until session 22.
DISTILL="{distill: {epochs: 28, views: 6, resolution: 160, label_weight: 1.0, batchnorm: train, lr: 0.001, warmup: 1}}"

declare -A PASSES=(
  # Pruned to 1/5, the head as it was (no labelled photos used at all).
  [prune-free]="[fold, {prune: {target_params: 0.2}}]"
  # The same, then the head refit on the pruned features (labelled photos, no refits).
  [prune-free-head]="[fold, {prune: {target_params: 0.2}}, {retarget: {data: $TRAIN, classes: $CLASSES}}]"
  # Calibrated (refits on 256 class-balanced photos) + head refit: the recipe before training.
  [prune-cal-head]="[fold, {prune: {target_params: 0.2}}, retarget]"
  # Depthwise rank 1 on every 3x3 conv but the stem (57 % of the weights: no 1/5 by dw alone).
  [dw-cal-head]="[fold, {dw: {rank: 1}}, fold, retarget]"
  # Factorizing-first at 1/5: low-rank 1x1 convs (not the 6-way head) + dw rank 1.
  [lr-dw-cal-head]="[fold, {lowrank: {ratio: 0.3, budget: 0.2, min_resolution: 7}}, {dw: {rank: 1}}, retarget]"
  # The same at the paper's 4.08 M weights (0.1728 of the task model's 23.6 M).
  [lr-dw-cal-head-4.08m]="[fold, {lowrank: {ratio: 0.3, budget: 0.1728, min_resolution: 7}}, {dw: {rank: 1}}, retarget]"
  # Factorizing-first with the 56-px 3x3 convs left dense (tract's depthwise kernels are memory-bound there).
  [lr-dw28-cal-head]="[fold, {lowrank: {ratio: 0.3, budget: 0.2, min_resolution: 7}}, {dw: {rank: 1, max_resolution: 28}}, retarget]"
  # Factorizing-first within 30 %, then pruning to 1/5 (fewer channels for tract's depthwise kernels).
  [lr-dw-prune-cal-head]="[fold, {lowrank: {ratio: 0.3, budget: 0.3, min_resolution: 7}}, {dw: {rank: 1}}, {prune: {target_params: 4720000}}, retarget]"
  # The same from a milder factorization (lowrank ratio 0.45): more of the 1/5 taken by pruning.
  [lr45-dw-prune-cal-head]="[fold, {lowrank: {ratio: 0.45, min_resolution: 7}}, {dw: {rank: 1}}, {prune: {target_params: 4700000}}, retarget]"
  # Prune + dw at 1/5 (the paper's combination): prune to 30 %, then dw rank 1.
  [prune-dw-cal-head]="[fold, {prune: {target_params: 0.3}}, {dw: {rank: 1}}, fold, retarget]"
  # dw first, then pruning to 1/5 (session 11: 0.8108 untrained, 3.3-3.8x).
  [dw-prune-cal-head]="[fold, {dw: {rank: 1}}, fold, {prune: {target_params: 4700000}}, retarget]"
  # The factorizing-first and prune + dw students above, trained as the recipe trains.
  [lr-dw-distill]="[fold, {lowrank: {ratio: 0.3, budget: 0.2, min_resolution: 7}}, {dw: {rank: 1}}, retarget, $DISTILL]"
  [prune-dw-distill]="[fold, {prune: {target_params: 0.3}}, {dw: {rank: 1}}, fold, retarget, $DISTILL]"
  # Session 11's run: lowrank 0.45 + dw + prune to 1/5 of the task model, 12 epochs (0.8908, 2.8x, 64 min).
  [lr45-dw-prune-distill]="[fold, {lowrank: {ratio: 0.45, min_resolution: 7}}, {dw: {rank: 1}}, {prune: {budget: 0.2}}, retarget, {distill: {epochs: 12, views: 6, resolution: 160, label_weight: 1.0, batchnorm: train, lr: 0.001, warmup: 1}}]"
  # The shipped recipe, as a user runs it (`pipeline: cresnet` on a task model).
  [cresnet-task]=""
  # The paper's budget, 4.08 M weights (docs/task-4.08m.yaml).
  [cresnet-task-4.08m]="[fold, {lowrank: {ratio: 0.3, budget: 0.1728}}, {dw: {rank: 1}}, {dw: {rank: 8, layout: grouped, stem: true}}, retarget, subsample]"
)
ORDER="task prune-free prune-free-head prune-cal-head dw-cal-head lr-dw-cal-head lr-dw-cal-head-4.08m lr-dw28-cal-head lr-dw-prune-cal-head lr45-dw-prune-cal-head prune-dw-cal-head dw-prune-cal-head cresnet-task cresnet-task-4.08m lr-dw-distill prune-dw-distill lr45-dw-prune-distill"
for name in ${@:-$ORDER}; do
  cfg=$OUT/$name.yaml
  if [[ $name == task ]]; then
    :
  elif [[ -n ${REUSE:-} && -f $OUT/$name.onnx && -f $OUT/$name.report.json ]]; then
    echo "reusing $OUT/$name.onnx"
  else
    if [[ $name == cresnet-task ]]; then echo "pipeline: cresnet" > "$cfg"; else echo "passes: ${PASSES[$name]}" > "$cfg"; fi
    [[ $name != *-free* ]] && echo "$CAL" >> "$cfg"
    [[ $name == cresnet-task-4.08m ]] && echo "calibration_defaults: { images: 512 }" >> "$cfg"
    /usr/bin/time -v $BIN "$TASK" -o "$OUT/$name.onnx" --config "$cfg" --report "$OUT/$name.report.json" 2> "$OUT/$name.log"
  fi
  $BIN check "$OUT/$name.onnx" --data "$TEST" --classes "$CLASSES" --format json --quiet > "$OUT/$name.check.json"
  $BIN bench "$OUT/$name.onnx" --threads 1,2 --runs 10 --json > "$OUT/$name.bench.json"
  python3 - "$name" "$OUT" <<'PY' | tee -a docs/task-ablation.jsonl
import json, os, re, sys
name, out = sys.argv[1], sys.argv[2]
load = lambda kind: json.load(open(f"{out}/{name}.{kind}.json"))
r, c, b = load("report"), load("check"), load("bench")
log = open(f"{out}/{name}.log").read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log)
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None
if isinstance(r, list):  # `retarget`'s report: its passes
    r = {"params_after": r[-1]["params_after"], "macs_after": r[-1]["macs_after"], "passes": r}
print(json.dumps({"name": name, "params": r["params_after"], "macs": r["macs_after"],
  "file_mb": round(os.path.getsize(f"{out}/{name}.onnx") / 1e6, 1),
  "latency_ms_1t": round(b[0]["median_ms"], 1), "latency_ms_2t": round(b[1]["median_ms"], 1),
  "top1": c["model"]["top1"], "images": c["images"],
  "optimize_s": round(secs, 1) if secs else None, "peak_gb": round(int(rss.group(1)) / 1e6, 2) if rss else None,
  "distill_log": [p["changed"] for p in r.get("passes", []) if p["pass"] == "distill"]}))
PY
done
