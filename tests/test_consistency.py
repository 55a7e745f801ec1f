"""`fit --init MODEL.onnx --consistency W`: the starting model, frozen, is the teacher on clean images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadbcnn_runtime import ModelSpec
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_train import data as D
from cadbcnn_train.config import TrainConfig
from cadbcnn_train.consistency import consistency_loss, teacher_of
from cadbcnn_train.model import create_model
from conftest import make_dataset


def test_loss_is_zero_on_agreement_positive_otherwise_and_trains_only_the_student():
    t = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 3.0, 0.0, 0.0]])
    assert float(consistency_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-7)
    assert float(consistency_loss(t + 5.0, t)) == pytest.approx(0.0, abs=1e-6)  # the same probabilities
    s = torch.zeros_like(t, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    loss = consistency_loss(s, teacher)
    p = torch.softmax(t, 1)
    expected = float((p * (torch.log_softmax(t, 1) - torch.log_softmax(torch.zeros_like(t), 1))).sum(1).mean())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and float(loss.detach()) > 0
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0 and teacher.grad is None


def test_teacher_is_a_frozen_copy():
    m = create_model("cadbcnn", num_classes=4)
    t = teacher_of(m.train())
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert not torch.equal(next(m.parameters()), next(t.parameters()))


def test_dataset_gives_the_clean_image_beside_the_augmented_one(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2, size=64, classes=("Benign", "Early", "Pre", "Pro"))
    ds = D.load(root)
    spec = ModelSpec(name="cadbcnn", version="0", class_names=ds.class_names, image_size=(64, 64))
    plain = D.ImageDataset(ds.samples, spec, images=ds.images)
    paired = D.ImageDataset(ds.samples, spec, images=ds.images, augment=D.Augment(crop_scale=0.8), with_clean=True)
    torch.manual_seed(0)
    x, clean, y = paired[3]
    x0, y0 = plain[3]
    assert y == y0 and torch.equal(clean, x0) and not torch.equal(x, x0) and x.shape == clean.shape


@pytest.mark.parametrize("kwargs, message", [({"consistency": 1.0}, "needs --init"),
                                             ({"consistency": -1.0}, "finite weight >= 0"),
                                             ({"consistency": float("nan")}, "finite weight >= 0")])
def test_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), **kwargs)


def test_refused_without_augmentation(onnx_model, tmp_path):
    with pytest.raises(ArgumentError, match="no --no-augment"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), init=str(onnx_model), consistency=1.0,
                    augment=False)


def test_fit_with_consistency_trains_and_records_it(onnx_model, tmp_path):
    from cadbcnn_train.checkpoint import load_checkpoint
    from cadbcnn_train.train import fit

    data = make_dataset(tmp_path / "data", per_class=10, size=64, classes=("Benign", "Early", "Pre", "Pro"))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cadbcnn", epochs=1, batch_size=8,
                      image_size=64, precision="fp32", threads=2, init=str(onnx_model), consistency=1.0,
                      augment_parts=("stain",), max_steps=2, bn_recal_images=16, calibrate=False, fit_ood=False)
    fit(cfg, quiet=True)
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ck.spec.training["consistency"] == 1.0 and ck.config["consistency"] == 1.0
