#!/usr/bin/env bash
# Issue 16: Born-Again networks where the first generation is not memorised — the demo's own
# protocol (all 60,000 training images, 15 epochs, the demo config's optimizer and schedule;
# train accuracy ≈ 95 %, test ≈ 92 %). Generation 0 is the demo's SmallCNN without KD of the
# same seed (bench/demo_seeds.py's student_no_kd, $GEN0S/seedS); generation 1 is the same
# SmallCNN, from the same initialisation (same seed), distilled from it with Hinton KD,
# alpha 0.9, T = 1 (the temperature chosen on validation for this student, RESULTS (a) and (c);
# Furlanello et al. 2018 also distil at T = 1). Nothing is chosen on test.
# Usage: bash bench/tuning/born_again_demo.sh [GEN0S=runs/demo_seeds_T1] [OUT=runs/tuning/born_again_demo]
set -euo pipefail
GEN0S=${GEN0S:-runs/demo_seeds_T1}
OUT=${OUT:-runs/tuning/born_again_demo}
SEEDS=${SEEDS:-"0 1 2"}
for S in $SEEDS; do
  GEN0=$GEN0S/seed$S/student_no_kd/student.safetensors
  [ -f "$OUT/seed$S/summary.json" ] || kdistill run src/kdistill/configs/fashion_mnist_demo.yaml \
    --set seed=$S --set output_dir=$OUT/seed$S \
    --set "teacher={model: small_cnn, checkpoint: $GEN0}" \
    --set distill.temperature=1 --set distill.alpha=0.9 \
    --set train.threads=1 --set train.progress=false --set train.tensorboard=false
done
