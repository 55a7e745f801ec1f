"""`fit --init MODEL.onnx --consistency W`: the starting model, frozen, is the teacher on clean images; or its logits
on the clean training images come from a table (`cadbcnn-train teacher`, `fit --teacher FILE`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cadbcnn_runtime import ModelSpec
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_train import data as D
from cadbcnn_train.config import TrainConfig
from cadbcnn_train.consistency import (consistency_loss, teacher_logits, teacher_of, teacher_targets,
                                      write_teacher)
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


@pytest.mark.parametrize("kwargs, message", [({"consistency": 1.0}, "needs a teacher"),
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


CLASSES = ("Benign", "Early", "Pre", "Pro")


def _teacher_file(onnx_model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6, size=64, classes=CLASSES)
    out = tmp_path / "teacher.json"
    write_teacher(onnx_model, data, out, log=lambda m: None)
    return data, out


def test_the_table_holds_the_init_models_answers_on_the_clean_images(onnx_model, tmp_path):
    """The same targets as `--init … --consistency`'s frozen teacher, without its forward pass."""
    from cadbcnn_train.onnx_init import load_onnx_weights

    data, out = _teacher_file(onnx_model, tmp_path)
    ds = D.load(data)
    rel = [s.path.relative_to(data).as_posix() for s in ds.samples]
    targets = teacher_targets(out, rel[::-1], ds.class_names)  # rows follow the order asked for
    spec = ModelSpec.from_onnx(onnx_model)
    model = create_model("cadbcnn", num_classes=4)
    load_onnx_weights(model, onnx_model)
    clean = torch.stack([D.ImageDataset(ds.samples, spec, images=ds.images)[i][0] for i in range(len(ds.samples))])
    live = teacher_logits(teacher_of(model), clean)
    assert targets.shape == (24, 4) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.flip(0), live, atol=1e-3, rtol=1e-3)
    raw = json.loads(out.read_text())
    assert raw["model"] == onnx_model.name and len(raw["model_sha256"]) == 64 and len(raw["logits"]) == 24


def test_a_split_file_keeps_only_its_training_images(onnx_model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4, size=64, classes=CLASSES)
    rows = ["path,label,split"] + [f"{c}/{f.name},{c},{'train' if i % 2 else 'val'}"
                                   for c in CLASSES for i, f in enumerate(sorted((data / c).iterdir()))]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    t = write_teacher(onnx_model, data, tmp_path / "t.json", split_file=tmp_path / "split.csv", log=lambda m: None)
    assert sorted(t["logits"]) == sorted(r.split(",")[0] for r in rows[1:] if r.endswith(",train"))


def test_a_table_that_does_not_fit_the_data_is_refused_naming_the_fix(onnx_model, tmp_path):
    data, out = _teacher_file(onnx_model, tmp_path)
    ds = D.load(data)
    rel = [s.path.relative_to(data).as_posix() for s in ds.samples]
    with pytest.raises(ArgumentError, match=r"no logits for 1 of the 25 training images \(first: Pro/new.png\)"):
        teacher_targets(out, rel + ["Pro/new.png"], ds.class_names)
    with pytest.raises(ArgumentError, match="are not this data's"):
        teacher_targets(out, rel, ("a", "b", "c", "d"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"logits": {}}')
    with pytest.raises(ArgumentError, match="not a teacher-logits file; write it with `cadbcnn-train teacher"):
        teacher_targets(bad, rel, ds.class_names)
    with pytest.raises(ArgumentError, match="not found"):
        teacher_targets(tmp_path / "none.json", rel, ds.class_names)
    raw = json.loads(out.read_text())
    for row in ([1.0, 2.0], [1.0, 2.0, 3.0, float("nan")], "1,2,3,4", [1.0, 2.0, 3.0, "x"], [1.0, 2.0, 3.0, True]):
        raw["logits"][rel[3]] = row
        ragged = tmp_path / "ragged.json"
        ragged.write_text(json.dumps(raw))
        with pytest.raises(ArgumentError, match=f"the row of {rel[3]} is not 4 finite logits; write the file again"):
            teacher_targets(ragged, rel, ds.class_names)


def test_dataset_gives_the_teachers_row_beside_the_augmented_image(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2, size=64, classes=CLASSES)
    ds = D.load(root)
    spec = ModelSpec(name="cadbcnn", version="0", class_names=ds.class_names, image_size=(64, 64))
    rows = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    paired = D.ImageDataset(ds.samples, spec, images=ds.images, augment=D.Augment(), targets=rows)
    x, t, y = paired[5]
    assert torch.equal(t, rows[5]) and y == ds.samples[5].label and x.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="8 samples"):
        D.ImageDataset(ds.samples, spec, targets=rows[:3])


@pytest.mark.parametrize("kwargs, message", [({"teacher": "t.json"}, "pass --consistency W"),
                                             ({"teacher": "missing.json", "consistency": 1.0}, "not found")])
def test_teacher_option_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), **kwargs)


def test_fit_from_scratch_learns_from_a_teacher_table_and_records_it(onnx_model, tmp_path):
    from cadbcnn_train.checkpoint import load_checkpoint
    from cadbcnn_train.train import fit

    data, out = _teacher_file(onnx_model, tmp_path)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cadbcnn", epochs=1, batch_size=8,
                      image_size=64, precision="fp32", threads=2, consistency=1.0, teacher=str(out),
                      augment_parts=("stain",), max_steps=2, bn_recal_images=16, calibrate=False, fit_ood=False)
    fit(cfg, quiet=True)
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    rec = ck.spec.training["teacher"]
    assert rec["file"] == "teacher.json" and rec["model"] == onnx_model.name and rec["images"] == 24
    assert "init" not in ck.spec.training and ck.config["teacher"] == str(out)


def test_teacher_command_writes_the_file(onnx_model, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2, size=64, classes=CLASSES)
    r = subprocess.run([sys.executable, "-m", "cadbcnn_train.cli", "teacher", str(onnx_model), "--data", str(data),
                        "--out", str(tmp_path / "t.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "logits of" in r.stdout and "on 8 images" in r.stdout
    assert len(json.loads((tmp_path / "t.json").read_text())["logits"]) == 8
    three = make_dataset(tmp_path / "three", per_class=2, size=64, classes=CLASSES[:3])
    bad = subprocess.run([sys.executable, "-m", "cadbcnn_train.cli", "teacher", str(onnx_model), "--data", str(three),
                          "--out", str(tmp_path / "t3.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "its classes" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "t3.json").exists()
