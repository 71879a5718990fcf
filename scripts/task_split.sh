#!/usr/bin/env bash
# A validation split of intel-scenes/train (issue #17, from session 21 on):
# choices between recipes are made on `val`, never on test/. Within each class
# folder, photos sorted by name (C locale): every 5th (index 4, 9, ...) goes to
# val, the rest to fit: 400 + 100 photos per class, 2,400 + 600 in all.
# Symlinks only (../shared is never copied).
#   scripts/task_split.sh [TRAIN_DIR] [OUT_DIR]
# then e.g.: cresnet-opt retarget IN.onnx --data OUT/fit --classes OUT/classes.txt -o task_fit.onnx
#            cresnet-opt check small.onnx --data OUT/val --classes OUT/classes.txt
set -euo pipefail
train=$(realpath "${1:-../shared/data/intel-scenes/train}")
out=${2:-split}
mkdir -p "$out/fit" "$out/val"
ln -sfn "$(realpath "$train/../classes.txt")" "$out/classes.txt"
for class_dir in "$train"/*/; do
  class=$(basename "$class_dir")
  mkdir -p "$out/fit/$class" "$out/val/$class"
  i=0
  while IFS= read -r photo; do
    if (( i % 5 == 4 )); then part=val; else part=fit; fi
    ln -sfn "$class_dir$photo" "$out/$part/$class/$photo"
    i=$((i + 1))
  done < <(LC_ALL=C ls "$class_dir" | LC_ALL=C sort)
done
echo "fit: $(find "$out/fit" -type l | wc -l) photos, val: $(find "$out/val" -type l | wc -l) photos" >&2
