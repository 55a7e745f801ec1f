#!/usr/bin/env bash
# How the released model in models/ was produced (after `make install`). Takes ~50 min on the 2-core CPU.
set -euo pipefail
DATA=${DATA:-../shared/data/all-leukemia}
RUN=${RUN:-runs/release-s0}
B=.venv/bin
$B/cadbcnn-train fit --data "$DATA" --out "$RUN" --epochs 30 --patience 30 --seed 0
$B/cadbcnn-train fit-ood "$RUN/best.pt" --data "$DATA"                  # (re)fit the OOD statistics
$B/cadbcnn-train evaluate "$RUN/best.pt" --data "$DATA" --split test --out "$RUN/eval"
$B/python scripts/split_folder.py "$RUN/split.csv" "$DATA" test build/test-split
$B/python scripts/split_folder.py "$RUN/split.csv" "$DATA" train build/train-split
# The release: FP32 compute, weights stored as FP16 (size budget), parity gate on the test images.
$B/cadbcnn-export "$RUN/best.pt" -o models/cadbcnn.onnx --fp16-weights --parity-data build/test-split \
    --report models/export-report.json
# The exact FP32 model and the INT8 / FP16 variants (not committed: size budget), with their gates.
$B/cadbcnn-export "$RUN/best.pt" -o build/release/cadbcnn.onnx --half --int8 --calibration-data build/train-split \
    --parity-data build/test-split --report build/release/export-report.json
$B/cadbcnn-train explain "$RUN/best.pt" --data "$DATA" --out docs/figures
$B/cadbcnn-train ood-report models/cadbcnn.onnx --data "$DATA" --split-file "$RUN/split.csv" --out docs/ood
