"""Give a variant (e.g. models/cadbcnn.int8.onnx) the review checks of its FP32 file, graph untouched, torch-free:

    .venv/bin/python scripts/copy_review_checks.py models/cadbcnn.onnx models/cadbcnn.int8.onnx

Copied from the source spec: ``calibration`` (temperature, clean and per-class review rule), ``review_threshold``,
``quality`` (field-content check) and ``appearance`` (appearance check). The variant keeps its own OOD statistics.
The thresholds were fitted on the source's outputs; docs/SHIFT.md measures what that means for the INT8 file.
Run the variant's own shift report before shipping it: the released FP32 file's smoothed appearance check was not
given to the INT8 file because that report failed (saturation ×0.5 3.4 % silent; docs/SHIFT.md, "The appearance
check smoothed"), so running this on models/ today would undo that decision.
"""

import sys
from pathlib import Path

from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.atomic import write_atomic
from cadbcnn_runtime.respec import replace_spec
from cadbcnn_runtime.variants import check_same_model

FIELDS = ("calibration", "review_threshold", "quality", "appearance")


def main(src: str, dst: str) -> int:
    source, target = ModelSpec.from_onnx(Path(src)), ModelSpec.from_onnx(Path(dst))
    check_same_model(source, target, Path(dst))
    spec = target.replace(**{k: getattr(source, k) for k in FIELDS})
    before = Path(dst).read_bytes()
    write_atomic(Path(dst), replace_spec(before, spec))
    with Classifier.from_file(Path(dst), device="cpu") as clf:  # loads: content hash re-stamped, spec valid
        print(f"{dst}: {', '.join(FIELDS)} copied from {src}; review thresholds {clf.review_thresholds}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
