"""Export the small random-weight model the runtime-only test environment uses.

    .venv/bin/python tests/make_test_model.py build/test-model.onnx
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def build(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import save_random_checkpoint

    from cadbcnn_export.exporter import export_checkpoint

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ck = save_random_checkpoint(Path(tmp) / "ck.pt", image_size=64)
        export_checkpoint(ck, out, log=lambda *a: None)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/test-model.onnx")))
