import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.selection import SHIFT_AWARE, ShiftedValidation, assigned_shifts, selection_score
from cadbcnn_train.shifts import SHIFTS, image_rng
from cadbcnn_train.train import fit, write_history
from conftest import make_dataset
from test_train import small_cfg

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(name="t", version="0", class_names=("a", "b"), image_size=(32, 32))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]


def test_selection_score_is_clean_f1_alone_or_its_mean_with_the_shifted_f1():
    assert selection_score(0.9, None) == 0.9
    assert selection_score(0.9, 0.7) == pytest.approx(0.8)


def test_every_shift_is_used_about_equally_and_an_images_copies_differ():
    shifts = assigned_shifts(100, 3, seed=5)
    assert len(shifts) == 300
    counts = Counter(s.name for s in shifts)
    assert set(counts) == {s.name for s in SHIFTS} and max(counts.values()) - min(counts.values()) <= 1
    for i in range(100):
        assert len({s.name for s in shifts[3 * i:3 * i + 3]}) == 3
    assert [s.name for s in assigned_shifts(10, 2, seed=0)] != [s.name for s in assigned_shifts(10, 2, seed=1)]


def test_shifted_validation_keeps_labels_and_uint8_rgb_and_is_deterministic_under_a_seed():
    images, labels = _images(12), [0, 1] * 6
    a = ShiftedValidation(images, labels, SPEC, copies=2, seed=3)
    b = ShiftedValidation(images, labels, SPEC, copies=2, seed=3)
    assert len(a) == 24 and a.labels == [lab for lab in labels for _ in range(2)]
    for k, (x, y) in enumerate(zip(a.images, b.images)):
        assert x.dtype == np.uint8 and x.shape == images[k // 2].shape
        assert np.array_equal(x, y)
        s = a.shifts[k]  # the image is exactly that shift of its source, drawn from the documented generator
        assert np.array_equal(x, s.apply(images[k // 2], image_rng(3, s.name, k)))
    tensor, label = a[5]
    assert tuple(tensor.shape) == (3, 32, 32) and label == labels[2]
    with pytest.raises(ValueError, match="copies"):
        ShiftedValidation(images, labels, SPEC, copies=0, seed=0)


@pytest.mark.parametrize("n", [-1, len(SHIFTS) + 1])
def test_select_shifted_outside_its_range_is_refused(tmp_path, n):
    with pytest.raises(ArgumentError, match="select_shifted must be 0"):
        small_cfg(tmp_path, tmp_path / "run", select_shifted=n)


def test_cli_refuses_a_negative_select_shifted_before_any_work(tmp_path):
    from cadbcnn_train.cli import app
    data = make_dataset(tmp_path / "d", per_class=2, size=32)
    r = CliRunner().invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"), "--select-shifted", "-1"])
    assert r.exit_code == 2 and "select_shifted must be 0" in r.output
    assert not (tmp_path / "run").exists()


def test_fit_keeps_the_epoch_with_the_best_shift_aware_score(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    run = tmp_path / "run"
    fit(small_cfg(data, run, epochs=3, max_steps=2, select_shifted=2), quiet=True)
    with open(run / "history.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    for r in rows:
        assert r["selection_score"] == pytest.approx((r["val_f1_macro"] + r["val_shifted_f1_macro"]) / 2)
    kept = max(rows, key=lambda r: r["selection_score"])  # the first of the best
    assert load_checkpoint(run / "best.pt").epoch + 1 == kept["epoch"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"] == SHIFT_AWARE and summary["best_epoch"] == kept["epoch"]
    assert summary["best_selection_score"] == pytest.approx(kept["selection_score"])
    assert summary["best_val_f1_macro"] == pytest.approx(kept["val_f1_macro"])
    # the release rule keeps best.pt for such a run (its score cannot be recomputed from clean validation)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "release_rule.py"), "choose", str(run)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "best"


def test_history_of_a_resumed_older_run_keeps_every_column(tmp_path):
    write_history(tmp_path, [{"epoch": 1, "val_f1_macro": 0.5}, {"epoch": 2, "val_f1_macro": 0.6,
                                                                  "selection_score": 0.6}])
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["selection_score"] == "" and rows[1]["selection_score"] == "0.6"


def test_fit_holds_its_review_rule_on_the_shifted_validation_images_when_asked(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    fit(small_cfg(data, tmp_path / "clean", epochs=1, max_steps=2, select_shifted=2), quiet=True)
    fit(small_cfg(data, tmp_path / "held", epochs=1, max_steps=2, select_shifted=2, shifted_target_risk=0.0),
        quiet=True)
    clean, held = (load_checkpoint(tmp_path / r / "best.pt").spec for r in ("clean", "held"))
    rec = held.calibration["shifted_review"]
    assert "shifted_review" not in clean.calibration
    assert rec["target_risk"] == 0.0 and rec["fitted_on"].endswith(" shifted validation images (2 per image)")
    assert held.calibration["temperature"] == pytest.approx(clean.calibration["temperature"])  # the clean fit's
    assert held.review_threshold == pytest.approx(max(clean.review_threshold, rec["threshold"]))
    assert "shifted validation images" in held.calibration["review_rule"]


@pytest.mark.parametrize("kw", [dict(shifted_target_risk=0.02), dict(shifted_target_risk=0.02, select_shifted=2,
                                                                      calibrate=False),
                                dict(shifted_target_risk=1.5, select_shifted=2)])
def test_a_shifted_review_rule_without_shifted_validation_or_calibration_is_refused(tmp_path, kw):
    with pytest.raises(ArgumentError, match="shifted_target_risk"):
        small_cfg(tmp_path, tmp_path / "run", **kw)


def test_cli_refuses_a_shifted_target_risk_without_select_shifted_before_any_work(tmp_path):
    from cadbcnn_train.cli import app
    data = make_dataset(tmp_path / "d", per_class=2, size=32)
    r = CliRunner().invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--shifted-target-risk", "0.02"])
    assert r.exit_code == 2 and "needs select_shifted" in r.output
    assert not (tmp_path / "run").exists()
