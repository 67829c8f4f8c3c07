#!/usr/bin/env bash
# Issue 16: Mean Teacher (Tarvainen & Valpola 2017) with 1,000 labels. 5,000 training images
# are held out for validation (data.val_size, the same for every run and seed); of the other
# 55,000, a class-stratified 1,000 carry labels (labelled_fraction 1000 / 55000) and all are
# seen by the consistency term, 5 epochs (labelled_share 0.25: a quarter of every batch is
# labelled), EMA 0.99 -> 0.999, consistency ramped up over 3 epochs. Grid on seed 0, chosen on
# validation: the consistency weight (1, 10). Baseline: the SmallCNN on 1,000 labelled images
# of the same 55,000 alone (data.train_subset 1000), 100 epochs (800 steps).
# Usage: bash bench/tuning/mean_teacher_1000.sh [OUT=runs/tuning/mean_teacher_1000]
set -euo pipefail
OUT=${OUT:-runs/tuning/mean_teacher_1000}
P=(--set data.val_size=5000 --set train.threads=1 --set train.progress=false
   --set train.tensorboard=false)
kdistill sweep examples/schemes/baseline.yaml "${P[@]}" --set data.train_subset=1000 \
  --set train.eval_every=25 --grid train.epochs=100 --seeds 0 1 2 \
  --output-dir "$OUT/labelled_only" --name final --resume
kdistill sweep examples/schemes/mean_teacher.yaml "${P[@]}" --set train.epochs=5 \
  --set scheme.mean_teacher.labelled_fraction=0.0181818 \
  --grid scheme.mean_teacher.consistency_weight=1,10 --seeds 0 \
  --output-dir "$OUT/mean_teacher" --name grid --resume
kdistill sweep "$OUT/mean_teacher/grid-best.yaml" --grid train.epochs=5 --seeds 0 1 2 \
  --output-dir "$OUT/mean_teacher" --name final --resume
