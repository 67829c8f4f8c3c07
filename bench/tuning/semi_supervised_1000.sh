#!/usr/bin/env bash
# Issue 16 (c): semi-supervised KD with 1,000 labels (1,000 / 60,000 = labelled_fraction 0.016667,
# class-stratified, the same 1,000 images as data.train_subset=1000 with the same seed).
#   labelled-only: the SmallCNN on the 1,000 labelled images, 100 epochs (800 optimizer steps)
#   teacher:       a TeacherCNN trained on the same 1,000 images for 100 epochs (inside the run)
#   taught:        the SmallCNN on all 60,000 images, KD (T 4, alpha 0.9) on every image, CE on
#                  the 1,000 labelled ones, 5 epochs (2,345 steps)
# train.eval_every=25: the test set is scored after epochs 25, 50, 75, 100 (and the last).
# Usage: bash bench/tuning/semi_supervised_1000.sh [OUT=runs/semi1000] [SEEDS="0 1 2"]
set -euo pipefail
OUT=${OUT:-runs/semi1000}
SEEDS=${SEEDS:-"0 1 2"}
COMMON="--set train.threads=1 --set train.progress=false --set train.tensorboard=false --set train.eval_every=25"
for S in $SEEDS; do
  [ -f "$OUT/labelled_only/seed$S/summary.json" ] || kdistill run examples/schemes/baseline.yaml \
    --set seed=$S --set output_dir=$OUT/labelled_only/seed$S --set data.train_subset=1000 \
    --set train.epochs=100 $COMMON
  [ -f "$OUT/semi_supervised/seed$S/summary.json" ] || kdistill run examples/schemes/semi_supervised.yaml \
    --set seed=$S --set output_dir=$OUT/semi_supervised/seed$S \
    --set scheme.semi_supervised.labelled_fraction=0.016667 \
    --set scheme.semi_supervised.teacher_epochs=100 --set train.epochs=5 $COMMON
done
