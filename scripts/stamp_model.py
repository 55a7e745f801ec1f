"""Add the content hash (spec.content_sha256) to a model exported before cadbcnn 0.2, in place.

    .venv/bin/python scripts/stamp_model.py models/cadbcnn.onnx

The graph and weights are not touched; only the spec gains its hash. Run it only on a file you trust (it
blesses whatever graph and spec the file holds now) — it was used once, on the released v0.1.0 model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

from cadbcnn_export.gates import _atomic_write
from cadbcnn_export.graph import set_spec
from cadbcnn_runtime.spec import ModelSpec


def stamp(path: Path) -> str:
    proto = onnx.load(str(path), load_external_data=False)
    spec = ModelSpec.from_onnx(path)
    set_spec(proto, spec)
    _atomic_write(proto, path)
    return ModelSpec.from_onnx(path).content_sha256


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["models/cadbcnn.onnx"]:
        print(arg, stamp(Path(arg)))
