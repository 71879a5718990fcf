#!/usr/bin/env bash
# Accuracy of the lossy passes on the shared ResNet-50, data-free and
# calibrated. Calibration: the first 256 images (sorted by path) of
# imagenet-1k-sample; evaluation: the other 744 (`check --skip 256`).
# Usage: scripts/measure.sh [CONFIG_NAME …]   (default: all below)
# Appends one JSON line per run to docs/measurements.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/resnet50-imagenet.onnx
DATA=$SHARED/data/imagenet-1k-sample
CLASSES=$SHARED/data/imagenet-1k-classes.txt
OUT=${OUT:-target/measure}
BIN=target/release/cresnet-opt
mkdir -p "$OUT" docs
[[ -n ${NO_BUILD:-} ]] || cargo build --release --quiet
# Calibration: `-cal` = the first 256 images; letters after it add options:
# x = also the first 256 unlabelled photos in the refits (refit_extra),
# X = all 1000 of them (1,256 refit images),
# b = block targets, r = fit convs read by a ReLU through it (through_relu),
# o = refits reproduce the model as loaded (`reference: original`; default:
# the previous pass's model).
calibration() {
  local flags=$1 extra=""
  [[ $flags == *x* ]] && extra+=", extra: [{ dir: $(realpath "$SHARED/data/unlabelled-photos") }], refit_extra: 256"
  [[ $flags == *X* ]] && extra+=", extra: [{ dir: $(realpath "$SHARED/data/unlabelled-photos") }], refit_extra: 1000"
  [[ $flags == *b* ]] && extra+=", target: block"
  [[ $flags == *r* ]] && extra+=", through_relu: true"
  [[ $flags == *o* ]] && extra+=", reference: original"
  echo "calibration: { data: $(realpath "$DATA"), images: 256$extra }"
}

declare -A PASSES=(
  [prune-m0.9-none]="[fold, {prune: {target_macs: 0.9, compensate: false}}]"
  [prune-m0.9-free]="[fold, {prune: {target_macs: 0.9}}]"
  [prune-m0.9-cal]="[fold, {prune: {target_macs: 0.9}}]"
  [prune-m0.7-none]="[fold, {prune: {target_macs: 0.7, compensate: false}}]"
  [prune-m0.7-free]="[fold, {prune: {target_macs: 0.7}}]"
  [prune-m0.7-cal]="[fold, {prune: {target_macs: 0.7}}]"
  [prune-m0.7-inner-cal]="[fold, {prune: {target_macs: 0.7, scope: inner}}]"
  [prune-m0.7-inner-free]="[fold, {prune: {target_macs: 0.7, scope: inner}}]"
  [prune-m0.5-none]="[fold, {prune: {target_macs: 0.5, compensate: false}}]"
  [prune-m0.5-free]="[fold, {prune: {target_macs: 0.5}}]"
  [prune-m0.5-cal]="[fold, {prune: {target_macs: 0.5}}]"
  [dw-r1-free]="[fold, {dw: {rank: 1}}]"
  [dw-r1-cal]="[fold, {dw: {rank: 1}}]"
  [dw-r2-free]="[fold, {dw: {rank: 2}}]"
  [dw-r2-cal]="[fold, {dw: {rank: 2}}]"
  [dw-r3-free]="[fold, {dw: {rank: 3}}]"
  [dw-r3-cal]="[fold, {dw: {rank: 3}}]"
  [dw-e0.9-free]="[fold, {dw: {energy: 0.9}}]"
  [dw-e0.9-cal]="[fold, {dw: {energy: 0.9}}]"
  [dw-e0.95-free]="[fold, {dw: {energy: 0.95}}]"
  [dw-e0.95-cal]="[fold, {dw: {energy: 0.95}}]"
  [prune-m0.7-inner-rec-cal]="[fold, {prune: {target_macs: 0.7, scope: inner, importance: reconstruction}}]"
  [prune-r0.25-inner-rec-cal]="[fold, {prune: {ratio: 0.25, scope: inner, importance: reconstruction}}]"
  [prune-r0.25-inner-cal]="[fold, {prune: {ratio: 0.25, scope: inner}}]"
  [prune-m0.7-best-cal]="[fold, {prune: {target_macs: 0.7, scope: inner, allocation: uniform, importance: reconstruction}}]"
  [prune-m0.9-best-cal]="[fold, {prune: {target_macs: 0.9, scope: inner, allocation: uniform, importance: reconstruction}}]"
  [prune-m0.5-best-cal]="[fold, {prune: {target_macs: 0.5, scope: inner, allocation: uniform, importance: reconstruction}}]"
  [prune-m0.7-best-all-cal]="[fold, {prune: {target_macs: 0.7, scope: inner, allocation: uniform, importance: reconstruction, refit: all}}]"
  [prune-m0.9-best-all-cal]="[fold, {prune: {target_macs: 0.9, scope: inner, allocation: uniform, importance: reconstruction, refit: all}}]"
  [prune-m0.5-best-all-cal]="[fold, {prune: {target_macs: 0.5, scope: inner, allocation: uniform, importance: reconstruction, refit: all}}]"
  [dw-r1-alt2-cal]="[fold, {dw: {rank: 1, alternate: 2}}]"
  [dw-r1-alt2-all-cal]="[fold, {dw: {rank: 1, alternate: 2, refit: all}}]"
  [dw-r2-alt2-all-cal]="[fold, {dw: {rank: 2, alternate: 2, refit: all}}]"
  [prune-m0.7-uall-cal]="[fold, {prune: {target_macs: 0.7, allocation: uniform, importance: reconstruction, refit: all}}]"
  [fifth-best-cal]="[fold, {prune: {target_params: 0.3, allocation: uniform, importance: reconstruction, refit: all}}, {dw: {rank: 1, alternate: 2, refit: all}}, fold]"
  [dw-r2-alt4-cal]="[fold, {dw: {rank: 2, alternate: 4}}]"
  [dw-r1-alt4-cal]="[fold, {dw: {rank: 1, alternate: 4}}]"
  [dw-r3-alt2-cal]="[fold, {dw: {rank: 3, alternate: 2}}]"
  [dw-e0.9-alt2-cal]="[fold, {dw: {energy: 0.9, alternate: 2}}]"
  [dw-e0.95-alt2-cal]="[fold, {dw: {energy: 0.95, alternate: 2}}]"
  [dw-r2-alt2-cal]="[fold, {dw: {rank: 2, alternate: 2}}]"
  [lr-r0.5-free]="[fold, lowrank]"
  [lr-r0.5-cal]="[fold, lowrank]"
  [fifth-lr-free]="[fold, {lowrank: {ratio: 0.265}}, {dw: {rank: 1}}]"
  [fifth-lr-cal]="[fold, {lowrank: {ratio: 0.265}}, {dw: {rank: 1}}]"
  [fifth-lrt-cal]="[fold, {lowrank: {target_params: 0.593}}, {dw: {rank: 1}}]"
  # Per-stage splits (session 5): the early stages (>= 28 px) keep more; the
  # first is `pipeline: cresnet`'s (5,124,268 weights), the others shift
  # weights between the 14 px and the 7 px + classifier stages.
  [fifth-split-cal]="[fold, {lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.2445, max_resolution: 14}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}]"
  [fifth-split-mid-cal]="[fold, {lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.35, min_resolution: 14, max_resolution: 14}}, {lowrank: {ratio: 0.207, max_resolution: 7}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}]"
  # Session 6: the classifier's rank (README "Where to spend the budget").
  # The recipe's split with the classifier left whole (over budget: how much
  # its factorization costs), and classifier ratio 0.4 paid by the 7 px stage.
  [fifth-split-fullfc-cal]="[fold, {lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.2445, max_resolution: 14, exclude: ['fc*']}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}]"
  [fifth-fc4-cal]="[fold, {lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.2445, min_resolution: 14, max_resolution: 14}}, {lowrank: {ratio: 0.204, min_resolution: 7, max_resolution: 7}}, {lowrank: {ratio: 0.4, max_resolution: 1}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}]"
  [fifth-split-late-cal]="[fold, {lowrank: {ratio: 0.6, min_resolution: 28}}, {lowrank: {ratio: 0.2, min_resolution: 14, max_resolution: 14}}, {lowrank: {ratio: 0.262, max_resolution: 7}}, {dw: {rank: 2, min_resolution: 28}}, {dw: {rank: 1, max_resolution: 14}}]"
)
ORDER="dw-r2-cal dw-r1-cal prune-m0.7-inner-cal prune-m0.9-cal dw-r1-free dw-r3-cal prune-m0.7-free prune-m0.7-none dw-e0.95-cal prune-m0.7-cal dw-r2-free dw-r3-free prune-m0.9-free prune-m0.9-none prune-m0.5-cal prune-m0.5-free prune-m0.5-none dw-e0.9-cal dw-e0.9-free dw-e0.95-free prune-m0.7-inner-free"
for name in ${@:-$ORDER}; do
  cfg=$OUT/$name.yaml
  base=$name flags=""
  [[ $name =~ ^(.*-cal)([xXbro]*)$ ]] && { base=${BASH_REMATCH[1]}; flags=${BASH_REMATCH[2]}; }
  echo "passes: ${PASSES[$base]}" > "$cfg"
  [[ $base == *-cal ]] && calibration "$flags" >> "$cfg"
  start=$(date +%s.%N)
  $BIN "$MODEL" -o "$OUT/$name.onnx" --config "$cfg" --report "$OUT/$name.report.json" --quiet
  opt_s=$(echo "$(date +%s.%N) - $start" | bc)
  $BIN check "$OUT/$name.onnx" --data "$DATA" --classes "$CLASSES" --skip 256 --format json --quiet > "$OUT/$name.check.json"
  python3 - "$name" "$OUT" "$opt_s" <<'PY' | tee -a docs/measurements.jsonl
import json, sys
name, out, opt_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = json.load(open(f"{out}/{name}.report.json")); c = json.load(open(f"{out}/{name}.check.json"))
print(json.dumps({"name": name, "params": r["params_after"], "macs": r["macs_after"],
  "macs_share": round(r["macs_after"] / 3857973248, 4), "params_share": round(r["params_after"] / 25636712, 4),
  "top1": c["model"]["top1"], "top5": c["model"]["top5"], "images": c["images"], "optimize_s": round(opt_s, 1)}))
PY
done
