#!/usr/bin/env bash
# How the released model in models/ was produced (after `make install`). ~55 min on the 2-core CPU.
set -euo pipefail
DATA=${DATA:-../shared/data/all-leukemia}
RUN=${RUN:-runs/release-s0}
B=.venv/bin
$B/cadbcnn-train fit --data "$DATA" --out "$RUN" --epochs 30 --patience 30 --seed 0
# Precise BN for the best-on-validation and the last checkpoint, then keep the better one on validation.
for c in best last; do
  $B/cadbcnn-train recalibrate-bn "$RUN/$c.pt" --data "$DATA" --out "$RUN/$c-bn.pt"
  $B/cadbcnn-train evaluate "$RUN/$c-bn.pt" --data "$DATA" --split val --out "$RUN/val-$c"
done
CHOSEN=$($B/python -c "import json,sys; f=lambda c: json.load(open('$RUN/val-'+c+'/metrics.json'))['f1_macro']; print('best' if f('best') >= f('last') else 'last')")
cp "$RUN/$CHOSEN-bn.pt" "$RUN/release.pt"
$B/cadbcnn-train fit-ood "$RUN/release.pt" --data "$DATA"                  # OOD statistics (train) + threshold (val)
$B/cadbcnn-train evaluate "$RUN/release.pt" --data "$DATA" --split test --out "$RUN/test" --store
$B/python scripts/split_folder.py "$RUN/split.csv" "$DATA" test build/test-split
$B/python scripts/split_folder.py "$RUN/split.csv" "$DATA" train build/train-split
# The release: FP32 compute, weights stored as FP16 (size budget), parity gate on the test images.
$B/cadbcnn-export "$RUN/release.pt" -o models/cadbcnn.onnx --fp16-weights --parity-data build/test-split \
    --report models/export-report.json
# The exact FP32 model and the INT8 / FP16 variants (not committed: size budget), with their gates.
$B/cadbcnn-export "$RUN/release.pt" -o build/release/cadbcnn.onnx --half --int8 \
    --calibration-data build/train-split --parity-data build/test-split --report build/release/export-report.json
$B/cadbcnn-train explain "$RUN/release.pt" --data "$DATA" --out docs/figures
$B/cadbcnn-train ood-report models/cadbcnn.onnx --data "$DATA" --split-file "$RUN/split.csv" --out docs/ood
