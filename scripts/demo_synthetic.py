"""Fallback demo while no model is released: train → export → infer on a tiny synthetic set.

Every step is the real toolkit (cadbcnn-train, cadbcnn-export, cadbcnn-infer);
only the data is synthetic, so the predictions mean nothing clinically.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from cadbcnn_train.synthetic import make_dataset

bin_dir = Path(sys.executable).parent
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = make_dataset(tmp / "data", per_class=12, size=64)
    run = lambda *a: subprocess.run([str(bin_dir / a[0]), *a[1:]], check=a[0] != "cadbcnn-infer")  # noqa: E731
    run("cadbcnn-train", "fit", "--data", str(data), "--out", str(tmp / "run"), "--model", "cadbcnn",
        "--epochs", "2", "--image-size", "64", "--batch-size", "8")
    run("cadbcnn-export", str(tmp / "run" / "best.pt"), "-o", str(tmp / "model.onnx"))
    run("cadbcnn-infer", str(data / "Pro"), "--model", str(tmp / "model.onnx"), "--out", "-")
