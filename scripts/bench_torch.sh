#!/usr/bin/env bash
# Issue #18: our training engine against PyTorch on the same students, in one run.
#   bash scripts/bench_torch.sh [PYTHON]     (PYTHON: a venv's python with torch and onnx2torch)
# Writes the three students of `cargo bench --bench pipeline -- --students`
# as ONNX files (folded original; rank-1 dw; the data-free 1/5 student of
# `pipeline: cresnet`), times our engine's step on them, then PyTorch's
# (scripts/bench_torch.py, BN after every conv as ours, 2 threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/tmp/venv-torch/bin/python}
MODEL=../shared/models/resnet50-imagenet.onnx
OUT=target/bench-torch
mkdir -p "$OUT"
cargo build --release --locked --quiet
BIN=target/release/cresnet-opt
$BIN "$MODEL" -o "$OUT/fold.onnx" --passes fold
printf 'passes: [fold, {dw: {rank: 1}}, fold]\n' > "$OUT/dw1.yaml"
$BIN "$MODEL" -o "$OUT/dw1.onnx" --config "$OUT/dw1.yaml"
$BIN "$MODEL" -o "$OUT/cresnet.onnx" --pipeline cresnet
echo "== ours (cargo bench --bench pipeline -- --students: forward + backward, BN after every conv, 2 threads)"
RAYON_NUM_THREADS=2 cargo bench --locked --bench pipeline -- --students 2>/dev/null | grep '^train '
echo "== PyTorch"
"$PY" scripts/bench_torch.py --bn --threads 2 "$OUT/fold.onnx" "$OUT/dw1.onnx" "$OUT/cresnet.onnx"
