#!/usr/bin/env bash
# Issue 16: the distillation schemes on the low-data protocol of zoo_lowdata.yaml — 5,000
# stratified training images, 5,000 more held out for validation, 20 epochs (800 optimizer
# steps: the SmallCNN fits its set), no augmentation, one thread. Per scheme: a small grid on
# seed 0 chosen on validation accuracy (`kdistill sweep --name grid`, files in bench/tuning/
# schemes_lowdata_*.yaml), then the chosen point on seeds 0 1 2 (`--name final`, reading
# seed 0 back). Baseline: the same SmallCNN on the labels alone, seeds 0 1 2.
# Multi-teacher's second teacher is a SmallCNN trained on all 60,000 images (the demo's
# student without KD, seed 0: runs/demo_seeds_T1/seed0/student_no_kd), copied to $TEACHER2.
# Usage: bash bench/tuning/schemes_lowdata.sh [OUT=runs/tuning/schemes_lowdata] [ONLY="dml ..."]
set -euo pipefail
OUT=${OUT:-runs/tuning/schemes_lowdata}
ONLY=${ONLY:-"baseline dml aux_heads multi_teacher online_teacher"}
TEACHER2=${TEACHER2:-runs/tuning/teachers/small_cnn_60k.safetensors}
T=bench/tuning
P=(--set data.train_subset=5000 --set data.val_size=5000 --set train.epochs=20
   --set train.eval_every=10 --set data.augment=false --set train.threads=1
   --set train.progress=false --set train.tensorboard=false)
ONE=(--grid train.epochs=20)  # a one-point grid: the config as it is

tune() {  # tune NAME CONFIG GRIDFILE [extra --set ...]: grid on seed 0, chosen point on 3 seeds
  local name=$1 config=$2 grid=$3; shift 3
  kdistill sweep "$config" "${P[@]}" "$@" --grid-file "$grid" --seeds 0 \
    --output-dir "$OUT/$name" --name grid --resume
  kdistill sweep "$OUT/$name/grid-best.yaml" "${ONE[@]}" --seeds 0 1 2 \
    --output-dir "$OUT/$name" --name final --resume
}

for scheme in $ONLY; do
  case $scheme in
    baseline)
      kdistill sweep examples/schemes/baseline.yaml "${P[@]}" "${ONE[@]}" --seeds 0 1 2 \
        --output-dir "$OUT/baseline" --name final --resume ;;
    dml) tune dml examples/schemes/dml.yaml $T/schemes_lowdata_dml.yaml ;;
    aux_heads) tune aux_heads examples/schemes/aux_heads.yaml $T/schemes_lowdata_aux_heads.yaml ;;
    online_teacher)
      tune online_teacher examples/schemes/online_teacher.yaml $T/schemes_lowdata_online_teacher.yaml ;;
    multi_teacher)
      SRC=runs/demo_seeds_T1/seed0/student_no_kd/student.safetensors
      while [ ! -f "$TEACHER2" ] && [ ! -f "$SRC" ]; do sleep 30; done
      [ -f "$TEACHER2" ] || { mkdir -p "$(dirname "$TEACHER2")"; cp "$SRC" "$TEACHER2"; }
      tune multi_teacher examples/schemes/multi_teacher.yaml $T/schemes_lowdata_multi_teacher.yaml \
        --set scheme.multi_teacher.pretrain_epochs=0
      # the TeacherCNN alone on the same seeds: the reference of the two-teacher point
      kdistill sweep examples/schemes/multi_teacher.yaml "${P[@]}" --set scheme.multi_teacher.pretrain_epochs=0 \
        --grid-file $T/schemes_lowdata_multi_teacher_single.yaml --seeds 0 1 2 \
        --output-dir "$OUT/multi_teacher" --name single --resume ;;
    *) echo "schemes_lowdata.sh: unknown scheme $scheme" >&2; exit 2 ;;
  esac
done
