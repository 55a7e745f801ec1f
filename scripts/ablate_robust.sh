#!/usr/bin/env bash
# Robust-augmentation ablation under the reduced protocol (112 px, 8 epochs, bf16; one split for every row),
# each variant trained, exported and run through the shift report (test split + other labs' healthy images).
#
#   scripts/ablate_robust.sh SPLIT_CSV VARIANT...      VARIANT = std | robust | a comma list of augment parts
#                                                      (PART=SHARE: that part at its own rate, e.g. scale=1,stain)
#   EPOCHS=N: train N epochs instead of 8 (run dir gets -eN)
#   ROBUST_P=P: --robust-p P (the share of images that get the parts without their own share; run dir gets -pP)
#   LIMIT=N: the shift report on N evenly strided test images per set (quicker; compare only runs with the same N)
#   SKIP_TRAIN=1: only the shift report of an existing run (e.g. std again with a LIMIT)
#
# Writes runs/ablate/<variant>/ (checkpoint, model.onnx, shift/shift_report.{md,json}).
set -euo pipefail
DATA=${DATA:-../shared/data/all-leukemia}
EXT=${EXT:-../shared/data/external}
B=.venv/bin
split=$1; shift
for v in "$@"; do
  run=runs/ablate/${v//,/+}${ROBUST_P:+-p$ROBUST_P}${EPOCHS:+-e$EPOCHS}
  parts=()
  [[ "$v" != std ]] && parts=(--augment-parts "$v")
  if [[ -z "${SKIP_TRAIN:-}" ]]; then
  $B/cadbcnn-train fit --data "$DATA" --out "$run" --split-file "$split" --seed 0 --image-size 112 --epochs "${EPOCHS:-8}" \
      --batch-size 32 --patience 8 "${parts[@]}" ${ROBUST_P:+--robust-p "$ROBUST_P"}
  $B/cadbcnn-export "$run/best.pt" -o "$run/model.onnx" --report "$run/export-report.json"
  fi
  $B/cadbcnn-train shift-report "$run/model.onnx" --data "$DATA" --split-file "$split" --split test \
      --external "$EXT/bccd-fields:healthy" --external "$EXT/pbc-cells:healthy" ${LIMIT:+--limit "$LIMIT"} --out "$run/shift${LIMIT:+-$LIMIT}"
done
