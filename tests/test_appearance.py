"""Appearance check: colour/contrast statistics per predicted class, fitted on training images, carried by the
spec, applied by the runtime (needs_review), fitted by `calibrate --appearance-check` before the per-class rule.
The tests marked ``runtime`` also run in the torch-free environment (make test-runtime)."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.appearance import (
    N_FEATURES,
    SMOOTH_SIGMA,
    AppearanceCheck,
    appearance_features,
    check_entry,
    fit_appearance,
)
from cadbcnn_runtime.cli import app as infer_app
from cadbcnn_runtime.errors import ModelSpecError
from cadbcnn_runtime.respec import replace_spec
from conftest import FOLDERS, onnx_calibration_setup

NAMES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")


def _images(colour, n, seed, size=32):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(np.array(colour, np.float32) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        cv2.circle(img, tuple(int(v) for v in rng.integers(8, size - 8, 2)), size // 6, (60, 30, 90), -1)
        out.append(img)
    return out


def _batch(images):
    return np.stack([im.transpose(2, 0, 1) for im in images])


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
@pytest.mark.parametrize("sigma", [0.0, SMOOTH_SIGMA])
def test_features_are_the_documented_cielab_statistics_and_ignore_the_input_dtype(sigma):
    img = _images((200, 150, 180), 1, seed=0)[0]
    f = appearance_features(_batch([img]), sigma)
    assert f.shape == (1, N_FEATURES)
    seen = cv2.GaussianBlur(img, (0, 0), sigma) if sigma else img  # the statistics are of the smoothed image
    lab = cv2.cvtColor(seen, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    for c in range(3):
        ch = lab[:, c].astype(np.float64)
        assert f[0, 5 * c] == pytest.approx(ch.mean()) and f[0, 5 * c + 1] == pytest.approx(ch.std())
        assert list(f[0, 5 * c + 2:5 * c + 5]) == list(np.quantile(ch, (0.05, 0.5, 0.95), method="inverted_cdf"))
    as_float = appearance_features(_batch([img]).astype(np.float32) / 255, sigma)
    np.testing.assert_array_equal(as_float, f)  # float [0, 1] inputs give the same features
    np.testing.assert_array_equal(appearance_features(_batch([img]), sigma), f)  # deterministic
    with pytest.raises(ValueError, match="N, 3, H, W"):
        appearance_features(img)


@pytest.mark.runtime
def test_smoothing_keeps_pixel_noise_out_of_the_check_and_old_entries_stay_unsmoothed():
    train = _images((200, 150, 180), 80, seed=5, size=64)
    labels = np.zeros(80, int)
    same = _images((200, 150, 180), 40, seed=6, size=64)
    noisy = [np.clip(im + np.random.default_rng(9).normal(0, 10, im.shape), 0, 255).astype(np.uint8) for im in same]
    warm = [np.clip(im.astype(np.float32) * (1.15, 1.0, 0.85), 0, 255).astype(np.uint8) for im in same]
    flagged = {}
    for sigma in (0.0, SMOOTH_SIGMA):
        entry = fit_appearance(appearance_features(_batch(train), sigma), labels, NAMES[:1], fitted_on="x",
                               quantile=0.98, smooth_sigma=sigma)
        check = AppearanceCheck(entry, NAMES[:1])
        assert entry["smooth_sigma"] == sigma and check.smooth_sigma == sigma
        flagged[sigma] = {name: float((check.scores(check.features(_batch(ims)), np.zeros(40, int)) > 1).mean())
                          for name, ims in (("noisy", noisy), ("warm", warm))}
    # a noisier camera with the same colours: every image flagged unsmoothed, most pass smoothed; a warm camera's
    # colours are flagged either way
    assert flagged[0.0] == {"noisy": 1.0, "warm": 1.0}
    assert flagged[SMOOTH_SIGMA]["noisy"] < 0.5 and flagged[SMOOTH_SIGMA]["warm"] == 1.0
    old = {k: v for k, v in entry.items() if k != "smooth_sigma"}  # a file fitted before the smoothing
    assert AppearanceCheck(old, NAMES[:1]).smooth_sigma == 0.0 and check_entry(old, NAMES[:1]) == []
    for bad in (-1.0, float("nan"), "1.5", True, 100.0):
        assert any("smooth_sigma" in p for p in check_entry({**entry, "smooth_sigma": bad}, NAMES[:1]))


def _fitted(quantile=0.99):
    colours = [(220, 190, 210), (170, 120, 190), (150, 110, 170), (235, 225, 235)]
    train = [im for k, c in enumerate(colours) for im in _images(c, 60, seed=k)]
    labels = np.repeat(np.arange(4), 60)
    entry = fit_appearance(appearance_features(_batch(train)), labels, NAMES, fitted_on="synthetic", quantile=quantile)
    return colours, train, labels, entry


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_fit_flags_a_colour_shift_of_the_predicted_class_and_keeps_its_own_images():
    colours, train, labels, entry = _fitted()
    check = AppearanceCheck(entry, NAMES)
    own = check.scores(appearance_features(_batch(train)), labels)
    assert 0.0 < (own > 1).mean() <= 0.02  # the 99th percentile of each class's own distances
    fresh = _images(colours[0], 40, seed=99)  # new images of the same look
    assert (check.scores(appearance_features(_batch(fresh)), np.zeros(40, int)) > 1).mean() < 0.1
    warm = [np.clip(im.astype(np.float32) * (1.15, 1.0, 0.85), 0, 255).astype(np.uint8) for im in fresh]
    assert (check.scores(appearance_features(_batch(warm)), np.zeros(40, int)) > 1).all()  # a warm camera
    # the distance is to the class it was *given*: Benign's look called Pro-B is atypical for Pro-B
    assert (check.scores(appearance_features(_batch(fresh)), np.full(40, 3)) > 1).all()
    assert entry["quantile"] == 0.99 and set(entry["classes"]) == set(NAMES) and not check_entry(entry, NAMES)


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_fit_refuses_too_few_images_and_bad_quantiles():
    feats = np.zeros((8, N_FEATURES))
    with pytest.raises(ValueError, match="at least 30"):
        fit_appearance(feats, np.zeros(8, int), ("a", "b"), fitted_on="x")
    with pytest.raises(ValueError, match="quantile"):
        fit_appearance(feats, np.zeros(8, int), ("a", "b"), fitted_on="x", quantile=1.0)


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_the_spec_carries_the_entry_and_refuses_a_broken_one(onnx_model):
    _, _, _, entry = _fitted()
    spec = ModelSpec.from_onnx(onnx_model).replace(appearance=entry)
    assert ModelSpec.from_json(spec.to_json()) == spec
    broken = {**entry, "classes": {n: c for n, c in entry["classes"].items() if n != "Pro-B"}}
    with pytest.raises(ModelSpecError, match="every class name"):
        spec.replace(appearance=broken)
    bad = {**entry, "classes": {**entry["classes"], "Pro-B": {**entry["classes"]["Pro-B"], "cut": 0.0}}}
    with pytest.raises(ModelSpecError, match="cut > 0"):
        spec.replace(appearance=bad)
    short = {**entry, "classes": {**entry["classes"], "Benign": {**entry["classes"]["Benign"], "mean": [0.0] * 3}}}
    with pytest.raises(ModelSpecError, match="inv_cov"):
        spec.replace(appearance=short)


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_the_runtime_reviews_an_atypical_image_whatever_its_confidence(onnx_model, tmp_path):
    spec = ModelSpec.from_onnx(onnx_model)
    model = tmp_path / "look.onnx"
    imgs = _images((200, 160, 190), 64, seed=3, size=spec.image_size[0])
    # every class's statistics from the same images: they are typical whatever label the random model gives them
    feats = appearance_features(_batch(imgs))
    entry = fit_appearance(np.concatenate([feats] * 4), np.repeat(np.arange(4), 64), spec.class_names,
                           fitted_on="test", quantile=0.999)
    model.write_bytes(replace_spec(onnx_model.read_bytes(), spec.replace(appearance=entry)))
    with Classifier.from_file(model, device="cpu", review_threshold=0.0) as clf:
        typical = clf.predict_batch(imgs[:8])
        assert all(p.appearance_score is not None and p.appearance_score <= 1 and not p.needs_review
                   for p in typical), [p.appearance_score for p in typical]
        cool = [np.clip(im.astype(np.float32) * (0.8, 1.0, 1.2), 0, 255).astype(np.uint8) for im in imgs[:8]]
        for p in clf.predict_batch(cool):
            assert p.atypical_appearance and p.needs_review and p.appearance_score > 1
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "typical.png"), cv2.cvtColor(imgs[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "cool.png"), cv2.cvtColor(cool[0], cv2.COLOR_RGB2BGR))
    r = CliRunner().invoke(infer_app, [str(d), "--model", str(model), "--out", str(tmp_path / "r.csv"), "-q"])
    assert r.exit_code == 0 and "1 unlike the training images' colour and contrast" in r.output, r.output
    assert "(onnxruntime, fp32)" in r.output, r.output  # the summary's other fields stay where they were
    rows = {row["path"]: row for row in csv.DictReader((tmp_path / "r.csv").open())}
    assert rows["cool.png"]["atypical_appearance"] == "True" and rows["cool.png"]["needs_review"] == "True"
    assert rows["typical.png"]["atypical_appearance"] == "False" and float(rows["typical.png"]["appearance_score"]) <= 1
    from cadbcnn_runtime.validate import validate  # a new site's report says how much the check reviews

    res = validate(model, d, tmp_path / "v", figures=False)
    assert res["stats"]["appearance_rate"] == 0.5
    assert {Path(i["path"]).name: i["atypical_appearance"] for i in res["images"]} == {"typical.png": False,
                                                                                      "cool.png": True}
    assert "Appearance check: 50" in (tmp_path / "v" / "validation.md").read_text()


def test_calibrate_onnx_fits_the_check_first_and_the_per_class_rule_on_what_it_keeps(tmp_path, onnx_model):
    """`calibrate MODEL.onnx --appearance-check Q --shifted-copies 2 --per-class`: the check is fitted on the
    training split per true class; the per-class thresholds count the images it flags as flagged."""
    from cadbcnn_runtime.calibration import per_class_review
    from cadbcnn_runtime.preprocess import read_image
    from cadbcnn_runtime.reliability import softmax
    from cadbcnn_train.cli import app
    from cadbcnn_train.selection import ShiftedValidation

    spec = ModelSpec.from_onnx(onnx_model)
    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=40, val_every=5)
    out = tmp_path / "out.onnx"
    args = ["calibrate", str(src), "--data", str(data), "--split-file", str(split), "--out", str(out),
            "--shifted-copies", "2", "--per-class", "--shifted-target-risk", "0.3"]
    r = CliRunner().invoke(app, args + ["--appearance-check", "0.98"])
    assert r.exit_code == 0, r.output
    assert "appearance check at the 98th percentile" in r.output
    new = ModelSpec.from_onnx(out)
    assert new.appearance["quantile"] == 0.98 and new.appearance["fitted_on"] == "training split (128 images)"
    assert [new.appearance["classes"][n]["n"] for n in new.class_names] == [32] * 4
    val = [(data / p, FOLDERS.index(lab)) for p, lab, sp in rows if sp == "val"]
    sv = ShiftedValidation([read_image(p) for p, _ in val], [k for _, k in val], spec, copies=2, seed=0)
    with Classifier.from_file(out, device="cpu") as clf:
        x = np.stack([clf.preprocess(im) for im in sv.images])
        logits, _ = clf.run_all(x)
        preds = clf.classify(x)
        looks = np.array([p.atypical_appearance for p in preds])
        assert looks.any()  # the shifted copies include colour shifts the check sees
        flagged = np.array([p.out_of_distribution or p.low_content or p.atypical_appearance for p in preds])
        expected = per_class_review(softmax(logits, clf.temperature), np.array(sv.labels), flagged,
                                    class_names=new.class_names, floor=new.review_threshold, target_risk=0.3,
                                    fitted_on="x")
        assert new.calibration["class_review"]["thresholds"] == pytest.approx(expected["thresholds"])
    # calibrating again without the option removes the check (it was fitted for the rule it came with)
    r = CliRunner().invoke(app, [a if a != str(out) else str(tmp_path / "plain.onnx") for a in args])
    assert r.exit_code == 0, r.output
    assert ModelSpec.from_onnx(tmp_path / "plain.onnx").appearance is None


@pytest.mark.parametrize("value, message", [("1.0", "quantile in"), ("0.2", "quantile in")])
def test_cli_refuses_a_bad_appearance_quantile_before_any_work(tmp_path, onnx_model, value, message):
    from cadbcnn_train.cli import app

    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(tmp_path / "nowhere"), "--split-file",
                                 str(tmp_path / "none.csv"), "--appearance-check", value])
    assert r.exit_code != 0 and message in r.output, r.output


def test_cli_refuses_the_check_on_a_checkpoint(tmp_path):
    from cadbcnn_train.cli import app

    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "x.pt"), "--data", str(tmp_path),
                                 "--appearance-check", "0.995"])
    assert r.exit_code != 0 and "fitted on an exported model" in r.output, r.output


def test_calibrate_refuses_a_class_too_small_for_the_check(tmp_path, onnx_model):
    from cadbcnn_train.cli import app

    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=6, val_every=2)
    r = CliRunner().invoke(app, ["calibrate", str(src), "--data", str(data), "--split-file", str(split), "--out",
                                 str(tmp_path / "o.onnx"), "--appearance-check", "0.98"])
    assert r.exit_code != 0 and "cannot be fitted on this training split" in r.output, r.output
    assert "at least 30" in r.output and not (tmp_path / "o.onnx").exists()
