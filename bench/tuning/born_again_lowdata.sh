#!/usr/bin/env bash
# Issue 16: Born-Again networks on the low-data protocol of bench/tuning/zoo_lowdata.yaml
# (5,000 training images, 5,000 held out, 20 epochs). Generation 0 is the zoo protocol's
# CE-only SmallCNN of the same seed (runs/tuning/zoo_lowdata/terms1.weight0/seedS: the same
# data, seed, schedule — born_again's own generation 0 reproduced it to the digit, 87.54 %);
# generation 1 is a fresh SmallCNN distilled from it with Hinton KD (alpha 0.9) at T.
# Usage: T=4 SEEDS="0 1 2" bash bench/tuning/born_again_lowdata.sh
set -euo pipefail
T=${T:-4}
OUT=${OUT:-runs/born_again_lowdata/T$T}
SEEDS=${SEEDS:-"0 1 2"}
for S in $SEEDS; do
  GEN0=runs/tuning/zoo_lowdata/terms1.weight0/seed$S/student.safetensors
  while [ ! -f "$GEN0" ]; do sleep 30; done  # written by the zoo sweep
  [ -f "$OUT/seed$S/summary.json" ] || kdistill run examples/schemes/born_again.yaml \
    --set seed=$S --set output_dir=$OUT/seed$S --set data.train_subset=5000 \
    --set data.val_size=5000 --set train.epochs=20 --set train.eval_every=10 \
    --set "teacher={model: small_cnn, checkpoint: $GEN0}" \
    --set scheme.born_again.generations=1 --set distill.temperature=$T --set distill.alpha=0.9 \
    --set train.threads=1 --set train.progress=false --set train.tensorboard=false
done
