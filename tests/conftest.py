"""Shared fixtures: synthetic datasets and small exported models.

Tests that carry the ``runtime`` marker must run without torch: they get their
model from $CADBCNN_TEST_MODEL (exported earlier by the main environment, see
tests/make_test_model.py) or, where torch is installed, export one here.
"""

from __future__ import annotations

import os
from pathlib import Path

import cadbcnn_runtime  # noqa: F401 — first, as in any user process: sets OpenCV's pixel limit before cv2 loads
import pytest

from cadbcnn_train.synthetic import CLASS_COLOURS, make_dataset  # noqa: F401 — tests import them from here

def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


# In the runtime-only environment (no torch) only the torch-free test module is collected.
RUNTIME_MODULES = {"test_runtime.py", "test_hardening.py", "test_reliability.py", "test_quality.py", "test_variants.py",
                   "test_distributed.py", "test_hooks.py", "test_report_html.py", "test_validate.py", "test_session_cache.py",
                   "test_appearance.py", "test_review_score.py"}
if not _torch_importable():
    collect_ignore = [p.name for p in Path(__file__).parent.glob("*.py")
                      if p.name not in RUNTIME_MODULES and p.name != "conftest.py"]


@pytest.fixture(scope="session", autouse=True)
def _session_cache_in_tmp(tmp_path_factory):
    """Sessions cache their optimised graphs (cadbcnn_runtime.session_cache): in a temporary folder, not ~/.cache."""
    old = os.environ.get("CADBCNN_CACHE_DIR")
    os.environ["CADBCNN_CACHE_DIR"] = str(tmp_path_factory.mktemp("ort-cache"))
    yield
    if old is None:
        os.environ.pop("CADBCNN_CACHE_DIR", None)
    else:
        os.environ["CADBCNN_CACHE_DIR"] = old


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def save_random_checkpoint(path: Path, *, model: str = "cadbcnn", image_size: int = 64, seed: int = 0,
                           class_names=("Benign", "Early Pre-B", "Pre-B", "Pro-B"),
                           class_folders=("Benign", "Early", "Pre", "Pro")) -> Path:
    import torch

    from cadbcnn_runtime.spec import ModelSpec
    from cadbcnn_train.checkpoint import save_checkpoint
    from cadbcnn_train.model import create_model

    torch.manual_seed(seed)
    m = create_model(model, num_classes=len(class_names)).eval()
    spec = ModelSpec(name=model, version="0.1.0", class_names=class_names, image_size=(image_size, image_size))
    save_checkpoint(path, model=m, model_name=model, model_kwargs={}, spec=spec, class_folders=class_folders,
                    config={"data": "synthetic"}, split_hash=None, epoch=0)
    return path


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory) -> Path:
    """A small (64-px) CADBCNN ONNX model with random weights, exported once per session."""
    env = os.environ.get("CADBCNN_TEST_MODEL")
    if env:
        p = Path(env)
        assert p.is_file(), f"$CADBCNN_TEST_MODEL={env} does not exist"
        return p
    if not _torch_importable():
        pytest.fail("no torch and no $CADBCNN_TEST_MODEL: run tests/make_test_model.py in the main environment")
    from make_test_model import build

    return build(tmp_path_factory.mktemp("model") / "model.onnx")


FOLDERS = ("Benign", "Early", "Pre", "Pro")


def onnx_calibration_setup(tmp_path: Path, onnx_model: Path, *, per_class: int, val_every: int):
    """For `calibrate MODEL.onnx` tests: (the model with class folders in its spec, the synthetic dataset, its
    split rows (path, label, split) — of every VAL_EVERY sorted images the last in val, the rest in train — and the
    split CSV)."""
    import csv

    from cadbcnn_runtime import ModelSpec
    from cadbcnn_runtime.respec import replace_spec

    spec = ModelSpec.from_onnx(onnx_model)
    src = tmp_path / "src.onnx"
    src.write_bytes(replace_spec(onnx_model.read_bytes(),
                                 spec.replace(training={**spec.training, "class_folders": list(FOLDERS)})))
    data = make_dataset(tmp_path / "d", per_class=per_class, size=32)
    rows = [(p.relative_to(data).as_posix(), p.parent.name, "val" if i % val_every == val_every - 1 else "train")
            for i, p in enumerate(sorted(data.rglob("*.png")))]
    split = tmp_path / "split.csv"
    with split.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return src, data, rows, split


def train_and_export(d: Path, *, per_class: int = 30) -> tuple[Path, Path]:
    """A 2-epoch 32-px ResNet18 on a synthetic dataset under D, exported with its OOD head: (data, model.onnx)."""
    from cadbcnn_export.exporter import export_checkpoint
    from cadbcnn_train.config import TrainConfig
    from cadbcnn_train.train import fit

    data = make_dataset(d / "data", per_class=per_class, size=32)
    cfg = TrainConfig(data=str(data), out=str(d / "run"), model="resnet18", epochs=2, batch_size=8, image_size=32,
                      lr=1e-3, warmup_epochs=0.2, precision="fp32", threads=2)
    fit(cfg, quiet=True)
    export_checkpoint(d / "run" / "best.pt", d / "m.onnx", log=lambda *a: None)
    return data, d / "m.onnx"

