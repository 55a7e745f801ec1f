"""`cadbcnn-train fit --init MODEL.onnx` (#14 item 3): the exported weights back in PyTorch, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.errors import CheckpointError
from cadbcnn_train.config import TrainConfig
from cadbcnn_train.model import create_model
from cadbcnn_train.onnx_init import freeze, load_onnx_weights, rederive_batchnorm
from conftest import make_dataset

X = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)


def _logits(model, x=X):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_onnx_to_pytorch_to_onnx_gives_the_same_logits(onnx_model, tmp_path):
    from cadbcnn_export.exporter import export_checkpoint
    from cadbcnn_train.checkpoint import save_checkpoint

    m = create_model("cadbcnn", num_classes=4)
    info = load_onnx_weights(m, onnx_model)
    assert info["folded_batchnorms"] > 30
    ort_logits = Classifier.from_file(onnx_model, device="cpu").run(X)
    np.testing.assert_allclose(_logits(m), ort_logits, atol=1e-5)
    spec = ModelSpec.from_onnx(onnx_model)
    save_checkpoint(tmp_path / "ck.pt", model=m, model_name="cadbcnn", model_kwargs={},
                         spec=spec.replace(content_sha256=None), class_folders=("Benign", "Early", "Pre", "Pro"),
                         config={"data": "synthetic"}, split_hash=None, epoch=0)
    export_checkpoint(tmp_path / "ck.pt", tmp_path / "again.onnx", log=lambda *a: None)
    np.testing.assert_allclose(Classifier.from_file(tmp_path / "again.onnx", device="cpu").run(X), ort_logits,
                               atol=1e-5)


def test_rederived_batchnorm_keeps_the_function_and_gets_real_statistics(onnx_model, tmp_path):
    m = create_model("cadbcnn", num_classes=4)
    load_onnx_weights(m, onnx_model)
    before = _logits(m)
    data = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (16, 3, 64, 64), dtype=np.uint8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(16)), batch_size=8)
    assert rederive_batchnorm(m, loader, torch.device("cpu")) == 16
    np.testing.assert_allclose(_logits(m), before, rtol=1e-4, atol=1e-4)
    bn = m.branch_a[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_weights_of_another_architecture_are_refused(onnx_model):
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_onnx_weights(create_model("resnet18", num_classes=4), onnx_model)


def test_freeze_early_and_backbone():
    m = create_model("cadbcnn", num_classes=4)
    names = freeze(m, "early")
    assert "branch_a.4" in names and "branch_b.5" in names and "branch_a.6" not in names
    assert not m.branch_a[4][0].conv1.weight.requires_grad and m.branch_a[6][0].conv1.weight.requires_grad
    m = create_model("cadbcnn", num_classes=4)
    freeze(m, "backbone")
    assert not any(p.requires_grad for p in m.branch_b.parameters()) and m.head.weight.requires_grad


def test_fit_init_fine_tunes_the_exported_model_and_records_it(onnx_model, tmp_path):
    from cadbcnn_train.checkpoint import load_checkpoint
    from cadbcnn_train.train import fit

    data = make_dataset(tmp_path / "data", per_class=10, size=64, classes=("Benign", "Early", "Pre", "Pro"))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cadbcnn", epochs=1, batch_size=8,
                      image_size=64, precision="fp32", threads=2, init=str(onnx_model), freeze="early",
                      max_steps=2, bn_recal_images=16, calibrate=False)
    fit(cfg, quiet=True)
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ck.spec.training["init"]["sha256"] and ck.spec.training["freeze"] == "early"
    assert ck.spec.adaptation[-1]["step"] == "fine-tune" and ck.spec.adaptation[-1]["images"] == 40
    start = create_model("cadbcnn", num_classes=4)
    load_onnx_weights(start, onnx_model)
    tuned = ck.build_model()
    key = "branch_a.4.0.conv1.weight"  # frozen: unchanged; a later stage: trained
    assert torch.equal(tuned.state_dict()[key], start.state_dict()[key])
    assert not torch.equal(tuned.state_dict()["branch_a.7.0.conv1.weight"], start.state_dict()["branch_a.7.0.conv1.weight"])
    # Frozen modules compute what the exported model computes: precise BN (bn_recal_images) and
    # `recalibrate-bn` keep their statistics and re-measure the trained stages' only.
    x = torch.rand(4, 3, 64, 64) * 255
    frozen_part = lambda m: m.branch_a[:6](m.normalize(x))  # noqa: E731 — stem, layer1, layer2
    with torch.no_grad():
        torch.testing.assert_close(frozen_part(tuned.eval()), frozen_part(start.eval()), rtol=1e-3, atol=5e-3)
    from typer.testing import CliRunner

    from cadbcnn_train.cli import app

    r = CliRunner().invoke(app, ["recalibrate-bn", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                                 "--out", str(tmp_path / "re.pt"), "--images", "16"])
    assert r.exit_code == 0 and "statistics kept: branch_a.0" in r.output, r.output
    re = load_checkpoint(tmp_path / "re.pt")
    bn = "branch_a.4.0.bn1.running_mean"
    assert torch.equal(re.state_dict[bn], ck.state_dict[bn])
    assert not torch.equal(re.state_dict["branch_a.7.0.bn1.running_mean"], ck.state_dict["branch_a.7.0.bn1.running_mean"])


def test_fit_init_refuses_mismatches_before_training(onnx_model, tmp_path):
    from cadbcnn_train.train import fit

    data = make_dataset(tmp_path / "data", per_class=4, size=64, classes=("Benign", "Early", "Pre", "Pro"))
    with pytest.raises(CheckpointError, match="--image-size 64"):
        fit(TrainConfig(data=str(data), out=str(tmp_path / "a"), image_size=32, init=str(onnx_model), epochs=1),
            quiet=True)
    other = make_dataset(tmp_path / "other", per_class=4, size=64, classes=("healthy", "Early", "Pre", "Pro"))
    with pytest.raises(CheckpointError, match="name the class folders as in the model"):
        fit(TrainConfig(data=str(other), out=str(tmp_path / "b"), image_size=64, init=str(onnx_model), epochs=1),
            quiet=True)
    from cadbcnn_runtime.errors import ArgumentError

    with pytest.raises(ArgumentError, match="MODEL.onnx"):
        TrainConfig(data=str(data), out=str(tmp_path / "c"), init=str(tmp_path / "missing.onnx"))
    assert not (tmp_path / "a" / "best.pt").exists() and not Path(tmp_path / "b" / "best.pt").exists()


def test_onnx_to_checkpoint_script_takes_every_weight_from_the_onnx(onnx_model, tmp_path):
    """scripts/onnx_to_checkpoint.py: a template checkpoint of the same architecture (other weights) becomes the
    ONNX file's model — same logits, the file's spec without its OOD entry, no OOD statistics."""
    import importlib.util

    from cadbcnn_train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(5)
    other = create_model("cadbcnn", num_classes=4)  # random weights: nothing of the template's may survive
    spec = ModelSpec.from_onnx(onnx_model)
    save_checkpoint(tmp_path / "template.pt", model=other, model_name="cadbcnn", model_kwargs={},
                    spec=spec.replace(content_sha256=None), class_folders=("Benign", "Early", "Pre", "Pro"),
                    config={"data": "synthetic"}, split_hash=None, epoch=3)
    path = Path(__file__).resolve().parents[1] / "scripts" / "onnx_to_checkpoint.py"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location("onnx_to_checkpoint", path))
    mod.__spec__.loader.exec_module(mod)
    mod.main(tmp_path / "template.pt", onnx_model, tmp_path / "out.pt")
    ck = load_checkpoint(tmp_path / "out.pt")
    ort_logits = Classifier.from_file(onnx_model, device="cpu").run(X)
    assert not np.allclose(_logits(other), ort_logits, atol=1e-3)
    np.testing.assert_allclose(_logits(ck.build_model()), ort_logits, atol=1e-5)
    assert ck.ood is None and ck.spec.ood is None and ck.spec.class_names == spec.class_names and ck.epoch == 3
