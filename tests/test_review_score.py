"""The learned review score (cadbcnn_runtime.review_score): the logistic fit, the design matrix, cross-fitting, the
each-shift thresholds on cross-fitted scores, the spec entry, the runtime's rule and `calibrate --review-score`."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.errors import ArgumentError, ModelSpecError
from cadbcnn_runtime.review_score import (L2, ReviewScore, Scored, check_entry, cross_fitted, design, fit_logistic,
                                          fit_review_score, n_features, trust_of)
from conftest import onnx_calibration_setup

NAMES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_fit_logistic_is_the_penalised_optimum_and_recovers_a_known_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3)) * (1.0, 3.0, 0.5) + (0.0, 5.0, -1.0)
    w_true = np.array([1.5, -0.7, 2.0])  # per raw column
    p = 1 / (1 + np.exp(-(x - x.mean(0)) @ w_true - 0.3))
    y = rng.random(len(p)) < p
    fit = fit_logistic(x, y, l2=1e-6)
    assert np.asarray(fit["coef"]) / np.asarray(fit["scale"]) == pytest.approx(w_true, rel=0.05)
    # with a real penalty the gradient of (log loss + l2/2 |w|^2) vanishes at the returned weights
    fit = fit_logistic(x, y, l2=50.0)
    z = (x - fit["mean"]) / fit["scale"]
    q = trust_of(fit, x)
    assert np.abs(z.T @ (q - y) + 50.0 * np.asarray(fit["coef"])).max() < 1e-6
    assert abs((q - y).sum()) < 1e-6  # intercept unpenalised
    with pytest.raises(ValueError, match="one value"):
        fit_logistic(x, np.ones(len(x), bool))


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_design_puts_each_image_in_its_predicted_class_block():
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    ratios = np.array([[0.5, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, np.e]])
    x = design(probs, np.array([0.2, 1.3]), ratios)
    assert x.shape == (2, n_features(4)) == (2, 28)
    assert x[0, :7] == pytest.approx([1, np.log(0.5), np.log(2), np.log(3), np.log(4), np.log(0.7 / 0.3), 0.2])
    assert not x[0, 7:].any() and not x[1, :21].any()
    assert x[1, 21:] == pytest.approx([1, 0, 0, 0, 1, np.log(0.8 / 0.2), 1.3])
    assert design(probs, None, ratios)[:, 6].tolist() == [0, 0]  # no OOD output: the feature is 0


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_cross_fitted_scores_come_from_fits_without_the_rows_group():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    y = x[:, 0] + rng.normal(size=300) > 0
    groups = np.repeat(np.arange(60), 5)  # five copies of each source image
    oof = cross_fitted(x, y, groups, folds=3)
    held = groups % 3 == 1
    assert oof[held] == pytest.approx(trust_of(fit_logistic(x[~held], y[~held], l2=L2), x[held]))
    assert not np.allclose(oof, trust_of(fit_logistic(x, y, l2=L2), x))
    with pytest.raises(ValueError, match="two groups"):
        cross_fitted(x, y, np.zeros(300, int), folds=1)


def _synthetic_site(rng, n=400):
    """Clean images: right, confident, typical. One shift whose errors are confident (0.999) but far from the
    training images' colours (ratio 3), while its right calls and the clean Benign calls are at 0.99–0.999 and
    typical. A confidence cut must review most clean Benign calls to hold that shift; the score need not."""
    def block(n, wrong_share, shifted):
        truth = rng.integers(0, 4, n)
        wrong = rng.random(n) < wrong_share
        label = np.where(wrong, 0, truth)  # errors are called Benign
        conf = np.where(wrong, rng.uniform(0.998, 0.9999, n), rng.uniform(0.99, 0.9995, n))
        probs = np.full((n, 4), 0.0)
        probs[np.arange(n), label] = conf
        probs[np.arange(n), (label + 1) % 4] = 1 - conf
        ratios = rng.uniform(0.3, 0.9, (n, 4))
        ratios[wrong, 0] = rng.uniform(2.5, 3.5, wrong.sum()) if shifted else ratios[wrong, 0]
        return Scored(probs, rng.uniform(0.1, 0.5, n), ratios, truth, np.zeros(n, bool), np.arange(n))
    return block(n, 0.0, False), block(n, 0.2, True)


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_the_score_holds_every_shift_on_cross_fitted_scores_reviewing_fewer_clean_images():
    from cadbcnn_runtime.calibration import each_shift_thresholds

    clean, shifted = _synthetic_site(np.random.default_rng(2))
    shifts = np.array(["hue −20°"] * len(shifted.labels))
    e = fit_review_score(clean, shifted, shifts, class_names=NAMES, target_risk=0.02, fitted_on="synthetic")
    assert e["cross_fit"]["achieved"] and e["cross_fit"]["worst_shift"]["silent_error_rate"] <= 0.02
    assert check_entry(e, NAMES) == []
    rs = ReviewScore(e, NAMES)
    clean_rev = rs.low(rs.scores(clean.probs, clean.ood, clean.ratios), clean.probs.argmax(1)).mean()
    conf_rule = each_shift_thresholds(shifted.probs.argmax(1), shifted.probs.max(1), shifted.labels,
                                      ~shifted.flagged, shifts, clean.probs.argmax(1), clean.probs.max(1),
                                      ~clean.flagged, n_classes=4, floor=0.0, target_risk=0.02)
    conf_rev = np.mean(clean.probs.max(1) < np.asarray(conf_rule["thresholds"])[clean.probs.argmax(1)])
    assert conf_rev > 0.15 and clean_rev < 0.05, (conf_rev, clean_rev)


@pytest.mark.runtime  # torch-free: the runtime suite runs it too
def test_check_entry_and_the_spec_refuse_a_broken_or_orphan_score(onnx_model):
    clean, shifted = _synthetic_site(np.random.default_rng(3), n=120)
    e = fit_review_score(clean, shifted, ["s"] * 120, class_names=NAMES, target_risk=0.05, fitted_on="x")
    assert "finite" in check_entry({**e, "coef": e["coef"][:-1]}, NAMES)[0]
    assert "every class name" in check_entry({**e, "thresholds": {"Benign": 0.5}}, NAMES)[0]
    with pytest.raises(ArgumentError, match="in \\[0, 1\\]"):
        ReviewScore({**e, "thresholds": dict.fromkeys(NAMES, 1.5)}, NAMES)
    spec = ModelSpec.from_onnx(onnx_model)
    calibration = {"method": "temperature", "temperature": 1.0, "review_score": e}
    with pytest.raises(ModelSpecError, match="needs an appearance entry"):
        spec.replace(calibration=calibration, appearance=None)


def test_calibrate_review_score_end_to_end(tmp_path, onnx_model):
    """`calibrate MODEL.onnx … --each-shift --appearance-check 0.98 --review-score`: the spec carries the score and
    keeps the per-class confidence thresholds for older runtimes; the runtime reviews by the score (and the floor
    and the flags); `cadbcnn-infer` writes its columns; a caller's review_threshold replaces the whole rule."""
    from cadbcnn_runtime.cli import app as infer_app
    from cadbcnn_train.cli import app

    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=40, val_every=5)
    out = tmp_path / "out.onnx"
    base = ["calibrate", str(src), "--data", str(data), "--split-file", str(split), "--shifted-copies", "23",
            "--per-class", "--shifted-target-risk", "0.3", "--appearance-check", "0.98"]
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "no.onnx"), "--review-score"])
    assert r.exit_code == 2 and "--each-shift" in r.output and not (tmp_path / "no.onnx").exists(), r.output
    r = CliRunner().invoke(app, base + ["--out", str(out), "--each-shift", "--review-score"])
    assert r.exit_code == 0, r.output
    assert "learned review score, thresholds" in r.output
    spec = ModelSpec.from_onnx(out)
    rs = spec.calibration["review_score"]
    assert set(rs["thresholds"]) == set(spec.class_names) and spec.calibration["class_review"]["thresholds"]
    assert rs["cross_fit"]["folds"] == 5 and rs["cross_fit"]["clean_images"] == 32
    assert "learned review score" in spec.calibration["review_rule"]
    with Classifier.from_file(out, device="cpu") as clf:
        assert clf.review_thresholds == dict.fromkeys(spec.class_names, spec.review_threshold)  # the floor only
        paths = [data / p for p, _, s in rows if s == "val"]
        x = np.stack([clf.preprocess(p) for p in paths])
        preds = clf.classify(x)
        looks = clf.appearance.features(x)
        logits, ood = clf.run_all(x)
        from cadbcnn_runtime.reliability import softmax

        probs = softmax(logits, clf.temperature)
        trust = ReviewScore(rs, spec.class_names).scores(probs, ood, clf.appearance.ratios(looks))
        assert [p.review_score for p in preds] == pytest.approx(trust.tolist())
        for p, t in zip(preds, trust):
            low = not t >= rs["thresholds"][p.label]
            assert p.low_review_score == low
            assert p.needs_review == (low or p.confidence < spec.review_threshold or p.out_of_distribution
                                      or p.low_content or p.atypical_appearance)
        with pytest.raises(ArgumentError, match="appearance features"):
            clf.predictions(logits, ood)
    with Classifier.from_file(out, device="cpu", review_threshold=0.5) as clf:
        assert clf.review_score is None and clf.classify(x)[0].review_score is None
    r = CliRunner().invoke(infer_app, [str(data / "Benign"), "--model", str(out), "--out", str(tmp_path / "r.csv"),
                                       "-q"])
    assert r.exit_code == 0 and "below the learned review score's threshold" in r.output, r.output
    got = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert {"review_score", "low_review_score"} <= set(got[0]) and all(0 <= float(g["review_score"]) <= 1 for g in got)
    from cadbcnn_runtime.validate import validate  # a new site's report states the rule it applied

    res = validate(out, data, tmp_path / "v", figures=False)
    assert res["review_score_thresholds"] == pytest.approx(rs["thresholds"])
    assert "learned review score below the threshold of its label" in (tmp_path / "v" / "validation.md").read_text()


def test_review_rules_refuses_to_score_a_review_score_report_as_confidence_thresholds(tmp_path):
    import json

    from cadbcnn_runtime.errors import DatasetError
    from cadbcnn_train.review_rules import spec_thresholds_of

    (tmp_path / "shift_report.json").write_text(json.dumps({
        "class_names": list(NAMES), "review_threshold": 0.6,
        "calibration": {"method": "temperature", "temperature": 1.0, "review_score": {"thresholds": {}}}}))
    with pytest.raises(DatasetError, match="review_score_study"):
        spec_thresholds_of(tmp_path)
