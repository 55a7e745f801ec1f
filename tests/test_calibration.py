"""Temperature calibration: fitted on validation logits, carried by the spec, applied by the runtime, gated at export."""

import numpy as np
import pytest

from cadbcnn_export.exporter import export_checkpoint
from cadbcnn_export.parity import torch_logits
from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.calibration import fit_calibration
from cadbcnn_runtime.errors import ExportError, ModelSpecError
from cadbcnn_runtime.reliability import softmax
from cadbcnn_train.checkpoint import load_checkpoint, resave_checkpoint
from cadbcnn_train.posthoc import calibrate_checkpoint, recalibrate_checkpoint
from cadbcnn_train.train import fit
from conftest import FOLDERS, make_dataset, onnx_calibration_setup, save_random_checkpoint
from test_train import small_cfg


def _with_temperature(ck_path, t):
    ck = load_checkpoint(ck_path)
    entry = {"method": "temperature", "temperature": t, "fitted_on": "test"}
    resave_checkpoint(ck, ck_path, model=ck.build_model(), spec=ck.spec.replace(calibration=entry))
    return ck_path


def test_fit_calibration_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    z = rng.normal(0, 1, (2000, 4))
    z[np.arange(2000), labels] += 1.5
    true_t = 0.4
    sampled = np.array([rng.choice(4, p=p) for p in softmax(z)])  # the truth follows softmax(z) …
    entry, review = fit_calibration(z / true_t, sampled, fitted_on="synthetic")  # … the model says z / 0.4
    assert entry["temperature"] == pytest.approx(1 / true_t, rel=0.15)
    assert entry["after"]["nll"] < entry["before"]["nll"] and entry["after"]["ece_15"] < entry["before"]["ece_15"]
    assert 0.0 < review <= 1.0 and entry["review_target_risk"] == 0.005


def test_temperature_round_trips_checkpoint_onnx_runtime_and_is_gated(tmp_path):
    ck = _with_temperature(save_random_checkpoint(tmp_path / "ck.pt", image_size=64, seed=1), 2.5)
    rep = export_checkpoint(ck, tmp_path / "m.onnx", log=lambda *a: None)
    gate = next(g for g in rep["artifacts"][0]["gates"] if g["name"].startswith("cadbcnn_runtime calibrated"))
    assert gate["passed"] and rep["artifacts"][0]["parity"]["runtime_probabilities"]["temperature"] == 2.5
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)
    ref = softmax(torch_logits(load_checkpoint(ck).build_model(), x), 2.5)
    with Classifier.from_file(tmp_path / "m.onnx", device="cpu") as clf:
        assert clf.temperature == 2.5 and ModelSpec.from_onnx(tmp_path / "m.onnx").calibration["temperature"] == 2.5
        got = np.array([[p.probabilities[c] for c in clf.spec.class_names] for p in clf.classify(x)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_export_gate_catches_a_runtime_that_ignores_the_temperature(tmp_path, monkeypatch):
    import cadbcnn_runtime.classifier as classifier

    ck = _with_temperature(save_random_checkpoint(tmp_path / "ck.pt", image_size=64, seed=2), 3.0)
    monkeypatch.setattr(classifier, "temperature_of", lambda calibration: 1.0)
    with pytest.raises(ExportError, match="calibrated probabilities"):
        export_checkpoint(ck, tmp_path / "m.onnx", log=lambda *a: None)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_temperatures_are_refused_by_the_spec():
    base = ModelSpec(name="m", version="1", class_names=("a", "b")).to_dict()
    for bad in ({"method": "temperature", "temperature": 0}, {"method": "temperature", "temperature": -1},
                {"method": "platt", "temperature": 1.0}, {"method": "temperature"}):
        with pytest.raises(ModelSpecError, match="calibration"):
            ModelSpec.from_dict({**base, "calibration": bad})


def test_fit_calibrates_on_validation_and_precise_bn_drops_the_stale_calibration(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=20, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=3, fit_ood=False), quiet=True)
    spec = load_checkpoint(tmp_path / "run" / "best.pt").spec
    assert spec.calibration["method"] == "temperature" and spec.calibration["temperature"] > 0
    assert "validation split" in spec.calibration["fitted_on"]
    assert 0 < spec.quality["min_content"] < spec.quality["fitted_min"] and "training split" in spec.quality["rule"]
    assert spec.review_threshold == pytest.approx(spec.review_threshold) and 0 < spec.review_threshold <= 1
    recalibrate_checkpoint(tmp_path / "run" / "best.pt", data, out=tmp_path / "bn.pt", images=16, log=lambda *a: None)
    stale = load_checkpoint(tmp_path / "bn.pt").spec
    assert stale.calibration is None and stale.review_threshold == ModelSpec.review_threshold
    entry = calibrate_checkpoint(tmp_path / "bn.pt", data, split_file=tmp_path / "run" / "split.csv",
                                 log=lambda *a: None)
    again = load_checkpoint(tmp_path / "bn.pt").spec
    assert again.calibration == entry and entry["temperature"] > 0


def test_cli_calibrate(tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_train.cli import app

    data = make_dataset(tmp_path / "d", per_class=12, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2, fit_ood=False, calibrate=False), quiet=True)
    assert load_checkpoint(tmp_path / "run" / "best.pt").spec.calibration is None
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                                 "--target-risk", "0.01"])
    assert r.exit_code == 0 and "temperature" in r.output, r.output
    spec = load_checkpoint(tmp_path / "run" / "best.pt").spec
    assert spec.calibration["review_target_risk"] == 0.01
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "run" / "best.pt"), "--data", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.output


def test_cli_calibrate_onnx_needs_a_split_and_class_folders(tmp_path, onnx_model):
    from typer.testing import CliRunner

    from cadbcnn_train.cli import app

    data = make_dataset(tmp_path / "d", per_class=4, size=32)
    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(data), "--out", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--split-file" in r.output
    (tmp_path / "split.csv").write_text("path,label,split\nBenign/Benign-001.png,Benign,val\n")
    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(data), "--split-file",
                                 str(tmp_path / "split.csv"), "--out", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "class folders" in r.output and not (tmp_path / "o.onnx").exists()


def test_shifted_review_is_the_risk_coverage_rule_on_calibrated_shifted_confidences():
    from cadbcnn_runtime.calibration import shifted_review
    from cadbcnn_runtime.reliability import choose_review_threshold
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) * 2
    logits[np.arange(400), labels] += rng.uniform(0, 4, 400)  # mostly right, some wrong
    record, threshold = shifted_review(logits, labels, temperature=0.5, target_risk=0.02, fitted_on="x")
    p = softmax(logits, 0.5)
    expected = choose_review_threshold(p.max(1), p.argmax(1) == labels, target_risk=0.02)
    assert threshold == pytest.approx(expected.threshold) and record["threshold"] == threshold
    kept = p.max(1) >= threshold
    assert np.mean(p.argmax(1)[kept] != labels[kept]) <= 0.02  # the documented target holds on the set
    assert record["accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels)) and record["fitted_on"] == "x"


def test_calibrate_with_shifted_copies_reviews_below_the_higher_threshold(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=12, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2, fit_ood=False, calibrate=False), quiet=True)
    ck = tmp_path / "run" / "best.pt"
    clean = calibrate_checkpoint(ck, data, out=tmp_path / "clean.pt", log=lambda *a: None)
    entry = calibrate_checkpoint(ck, data, out=tmp_path / "shifted.pt", shifted_copies=2, shifted_target_risk=0.0,
                                 log=lambda *a: None)
    spec, clean_spec = load_checkpoint(tmp_path / "shifted.pt").spec, load_checkpoint(tmp_path / "clean.pt").spec
    assert entry["temperature"] == pytest.approx(clean["temperature"])  # the temperature stays the clean one's
    rec = spec.calibration["shifted_review"]
    assert rec["target_risk"] == 0.0 and "shifted validation images (2 per image)" in rec["fitted_on"]
    assert spec.review_threshold == pytest.approx(max(clean_spec.review_threshold, rec["threshold"]))
    assert "shifted" in spec.calibration["review_rule"]


def test_cli_calibrate_refuses_bad_shifted_options_before_any_work(tmp_path, onnx_model):
    from typer.testing import CliRunner

    from cadbcnn_train.cli import app

    data = make_dataset(tmp_path / "d", per_class=2, size=32)
    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(data), "--split-file",
                                 str(tmp_path / "s.csv"), "--out", str(tmp_path / "o.onnx"), "--per-class"])
    assert r.exit_code == 2 and "give --shifted-copies N too" in r.output and not (tmp_path / "o.onnx").exists()
    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(data), "--split-file",
                                 str(tmp_path / "s.csv"), "--out", str(tmp_path / "o.onnx"), "--shifted-copies", "24"])
    assert r.exit_code == 2 and "--shifted-copies must be 0" in r.output and not (tmp_path / "o.onnx").exists()
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "x.pt"), "--data", str(data), "--shifted-copies", "99"])
    assert r.exit_code == 2 and "--shifted-copies must be 0" in r.output
    r = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--data", str(data), "--split-file",
                                 str(tmp_path / "s.csv"), "--out", str(tmp_path / "o.onnx"), "--shifted-copies", "23",
                                 "--each-shift"])
    assert r.exit_code == 2 and "give --per-class" in r.output and not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# The review rule per predicted class (calibration.class_review)
# ---------------------------------------------------------------------------------------------------------------
def _probs(label_conf):
    """Probabilities whose argmax and max are the given (label, confidence) pairs."""
    p = np.full((len(label_conf), 4), 0.0)
    for i, (k, c) in enumerate(label_conf):
        p[i] = (1 - c) / 3
        p[i, k] = c
    return p


def test_per_class_review_raises_only_the_class_whose_kept_predictions_are_wrong():
    from cadbcnn_runtime.calibration import per_class_review
    from cadbcnn_runtime.reliability import choose_review_threshold

    # Pro-B (3) labels: 40 right at 0.99, 10 wrong at 0.95; Benign (0) labels: 50 right at 0.9; Early (1): 50 right
    # at 0.8; one wrong Pre-B (2) label at 0.999 that the OOD check flags: never kept, so it must not count.
    pairs = [(3, 0.99)] * 40 + [(3, 0.95)] * 10 + [(0, 0.9)] * 50 + [(1, 0.8)] * 50 + [(2, 0.999)]
    truth = np.array([3] * 40 + [0] * 10 + [0] * 50 + [1] * 50 + [0])
    flagged = np.zeros(len(pairs), bool)
    flagged[-1] = True
    rec = per_class_review(_probs(pairs), truth, flagged, class_names=NAMES, floor=0.85, target_risk=0.02,
                           fitted_on="x")
    t = rec["thresholds"]
    assert t["Pro-B"] == pytest.approx(0.99)          # the wrong Pro-B labels sit below it
    assert t["Benign"] == pytest.approx(0.9)         # all right: the lowest confidence, above the floor
    assert t["Early Pre-B"] == 0.85                  # all right below the floor: the floor
    assert t["Pre-B"] == 0.85 and rec["kept_images"]["Pre-B"] == 0  # only a flagged image: nothing to hold
    p = _probs(pairs)
    for c, name in enumerate(NAMES):  # the documented target holds per class on the set
        kept = ~flagged & (p.argmax(1) == c) & (p.max(1) >= t[name])
        assert not kept.any() or np.mean(p.argmax(1)[kept] != truth[kept]) <= 0.02
        m = ~flagged & (p.argmax(1) == c)
        if m.any():
            r = choose_review_threshold(p.max(1)[m], (p.argmax(1) == truth)[m], target_risk=0.02)
            assert t[name] == pytest.approx(max(0.85, r.threshold))


NAMES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")


def _with_class_review(onnx_model, dest, thresholds, review=0.5):
    from cadbcnn_runtime.respec import replace_spec

    spec = ModelSpec.from_onnx(onnx_model)
    entry = {"method": "temperature", "temperature": 1.0, "fitted_on": "t",
             "class_review": {"thresholds": thresholds}}
    dest.write_bytes(replace_spec(onnx_model.read_bytes(), spec.replace(calibration=entry, review_threshold=review)))
    return dest


def test_the_runtime_reviews_each_prediction_below_its_class_threshold(tmp_path, onnx_model):
    names = ModelSpec.from_onnx(onnx_model).class_names
    model = _with_class_review(onnx_model, tmp_path / "m.onnx", {names[0]: 0.99, names[1]: 0.3})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 3, 64, 64), dtype=np.uint8)
    with Classifier.from_file(model, device="cpu") as clf:
        assert clf.review_thresholds == {names[0]: 0.99, names[1]: 0.5, names[2]: 0.5, names[3]: 0.5}  # raise-only
        preds = clf.classify(x)
        for p in preds:
            assert p.needs_review == (p.confidence < clf.review_thresholds[p.label] or p.out_of_distribution)
            assert type(p.needs_review) is bool
    with Classifier.from_file(model, device="cpu", review_threshold=0.2) as clf:  # an override replaces the rule
        assert set(clf.review_thresholds.values()) == {0.2} and clf.review_override == 0.2
        assert all(p.needs_review == (p.confidence < 0.2 or p.out_of_distribution) for p in clf.classify(x))
    # a new site's validation report states the rule the runtime applied, not only its floor
    import cv2

    from cadbcnn_runtime.validate import validate

    d = tmp_path / "site"
    d.mkdir()
    for i, im in enumerate(x[:4]):
        cv2.imwrite(str(d / f"{i}.png"), im.transpose(1, 2, 0))
    res = validate(model, d, tmp_path / "v", figures=False)
    assert res["review_thresholds"] == {names[0]: 0.99, names[1]: 0.5, names[2]: 0.5, names[3]: 0.5}
    assert f"the threshold of its label ({names[0]} 0.99, {names[1]} 0.5" in (tmp_path / "v" / "validation.md").read_text()


@pytest.mark.parametrize("thresholds", [{"Nope": 0.9}, {"Benign": 1.5}, {"Benign": True}, "0.9"])
def test_bad_class_review_thresholds_are_refused_by_the_spec(thresholds):
    spec = ModelSpec(name="m", version="1", class_names=NAMES)
    with pytest.raises(ModelSpecError, match="class_review"):
        spec.replace(calibration={"method": "temperature", "temperature": 1.0,
                                  "class_review": {"thresholds": thresholds}})


@pytest.mark.parametrize("each_shift", [False, True])
def test_calibrate_onnx_per_class_end_to_end(tmp_path, onnx_model, each_shift):
    """`calibrate MODEL.onnx --shifted-copies 2 --per-class [--each-shift]`: the graph is untouched, the spec gets a
    class_review record whose thresholds are per_class_review (each_shift_review) on the shifted validation images
    (flagged ones not kept), and the runtime applies them."""
    from typer.testing import CliRunner

    from cadbcnn_runtime.calibration import each_shift_review, per_class_review
    from cadbcnn_train.cli import app
    from cadbcnn_train.selection import ShiftedValidation

    spec = ModelSpec.from_onnx(onnx_model)
    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=6, val_every=2)
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(app, ["calibrate", str(src), "--data", str(data), "--split-file", str(split),
                                 "--out", str(out), "--shifted-copies", "2", "--per-class",
                                 "--shifted-target-risk", "0.3"] + ["--each-shift"] * each_shift)
    assert r.exit_code == 0, r.output
    assert ("per predicted class on every shift of the shifted images" if each_shift
            else "per predicted class on shifted images") in r.output
    new = ModelSpec.from_onnx(out)
    rec = new.calibration["class_review"]
    assert rec["fitted_on"] == "24 shifted validation images (2 per image)" and rec["target_risk"] == 0.3
    assert rec["floor"] == new.review_threshold and "raised per predicted class" in new.calibration["review_rule"]
    # recompute the record from the same shifted images through the runtime
    val = [(data / p, FOLDERS.index(lab)) for p, lab, sp in rows if sp == "val"]
    from cadbcnn_runtime.preprocess import read_image
    sv = ShiftedValidation([read_image(p) for p, _ in val], [k for _, k in val], spec, copies=2, seed=0)
    with Classifier.from_file(out, device="cpu") as clf:
        x = np.stack([clf.preprocess(im) for im in sv.images])
        logits, ood = clf.run_all(x)
        preds = clf.classify(x)
        flagged = np.array([p.out_of_distribution or p.low_content for p in preds])
        xv = np.stack([clf.preprocess(p) for p, _ in val])
        pv = clf.classify(xv)
        keep = np.array([not (q.out_of_distribution or q.low_content) for q in pv])
        if each_shift:
            expected = each_shift_review(softmax(logits, clf.temperature), np.array(sv.labels), flagged,
                                         [s.name for s in sv.shifts], clean_probs=softmax(clf.run(xv), clf.temperature),
                                         clean_flagged=~keep, class_names=new.class_names,
                                         floor=new.review_threshold, target_risk=0.3, fitted_on="x")
            assert rec["rule"] == "each shift" and "of each shift's images" in new.calibration["review_rule"]
            assert rec["worst_shift"] == expected["worst_shift"] and rec["worst_shift"]["silent_error_rate"] <= 0.3
        else:
            expected = per_class_review(softmax(logits, clf.temperature), np.array(sv.labels), flagged,
                                        class_names=new.class_names, floor=new.review_threshold, target_risk=0.3,
                                        fitted_on="x")
        assert rec["thresholds"] == pytest.approx(expected["thresholds"])
        assert clf.review_thresholds == pytest.approx(rec["thresholds"])
        # the floor is the clean rule on the validation images the runtime keeps (flagged ones reviewed anyway)
        from cadbcnn_runtime.reliability import choose_review_threshold
        conf = np.array([q.confidence for q in pv])
        right = np.array([q.index for q in pv]) == np.array([k for _, k in val])
        assert new.review_threshold == pytest.approx(
            choose_review_threshold(conf[keep], right[keep], target_risk=0.005).threshold)
        assert "not counted as kept" in new.calibration["review_rule"]
        with Classifier.from_file(src, device="cpu") as before:
            np.testing.assert_array_equal(before.run(x[:4]), clf.run(x[:4]))  # graph untouched


@pytest.mark.parametrize("each_shift", [False, True])
def test_calibrate_checkpoint_per_class(tmp_path, each_shift):
    data = make_dataset(tmp_path / "d", per_class=12, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2, fit_ood=False, calibrate=False), quiet=True)
    entry = calibrate_checkpoint(tmp_path / "run" / "best.pt", data, out=tmp_path / "pc.pt", shifted_copies=2,
                                 shifted_target_risk=0.1, per_class=True, each_shift=each_shift, log=lambda *a: None)
    assert entry["class_review"].get("rule") == ("each shift" if each_shift else None)
    spec = load_checkpoint(tmp_path / "pc.pt").spec
    rec = spec.calibration["class_review"]
    assert set(rec["thresholds"]) == set(spec.class_names) and rec == entry["class_review"]
    assert all(spec.review_threshold <= t <= 1 for t in rec["thresholds"].values())
    assert "shifted_review" not in spec.calibration  # one shifted rule or the other


# ---------------------------------------------------------------------------------------------------------------
# The review rule held on every shift (calibrate --per-class --each-shift)
# ---------------------------------------------------------------------------------------------------------------
def _silent_per_shift(p, truth, flagged, shifts, thresholds):
    t = np.array([thresholds[n] for n in NAMES])
    silent = ~flagged & (p.argmax(1) != truth) & (p.max(1) >= t[p.argmax(1)])
    return {s: float(silent[shifts == s].mean()) for s in np.unique(shifts)}


def test_each_shift_review_holds_a_shift_the_pooled_class_rule_lets_through():
    from cadbcnn_runtime.calibration import each_shift_review, per_class_review

    # shift "hue": 4 Early Pre-B images called Benign at 0.95 among 100 (4 % silent); shift "blur": 200 Benign
    # images called Benign at 0.9 and 0.99 — pooled over Benign labels 4 / 204 = 2.0 % wrong, so the pooled rule
    # keeps the lowest Benign confidence, 0.9, and the four silent errors with it.
    pairs = [(0, 0.95)] * 4 + [(1, 0.99)] * 96 + [(0, 0.9)] * 100 + [(0, 0.99)] * 100
    truth = np.array([1] * 4 + [1] * 96 + [0] * 200)
    shifts = np.array(["hue"] * 100 + ["blur"] * 200)
    clean = _probs([(0, 0.97)] * 20 + [(1, 0.99)] * 20)
    p = _probs(pairs)
    pooled = per_class_review(p, truth, None, class_names=NAMES, floor=0.85, target_risk=0.02, fitted_on="x")
    assert pooled["thresholds"]["Benign"] == 0.9
    assert _silent_per_shift(p, truth, np.zeros(len(p), bool), shifts, pooled["thresholds"])["hue"] == 0.04
    rec = each_shift_review(p, truth, None, shifts, clean_probs=clean, clean_flagged=None, class_names=NAMES,
                            floor=0.85, target_risk=0.02, fitted_on="x")
    per_shift = _silent_per_shift(p, truth, np.zeros(len(p), bool), shifts, rec["thresholds"])
    assert max(per_shift.values()) <= 0.02 and rec["achieved"] and rec["rule"] == "each shift"
    assert rec["worst_shift"] == {"shift": max(per_shift, key=per_shift.get), "silent_error_rate": max(per_shift.values())}
    # the lowest threshold that reviews enough of the 0.95 calls: two of the four kept (2 %) would do, but tied
    # confidences are kept or reviewed together, so the next observed Benign confidence above 0.95
    assert rec["thresholds"]["Benign"] == pytest.approx(0.99)
    assert rec["clean_reviewed"] == 20  # the 20 clean Benign calls at 0.97 pay for it


def test_each_shift_review_spares_the_clean_images_a_pooled_class_rule_reviews():
    from cadbcnn_runtime.calibration import each_shift_review, per_class_review

    # ten shifts, each with one Pre-B image called Pro-B at 0.95 among 100 (1 % silent per shift) and 20 Pro-B
    # calls at 0.99; pooled over Pro-B labels 10 / 210 = 4.8 % wrong, so the pooled rule raises Pro-B above 0.95
    # and reviews the clean Pro-B calls at 0.96. Flagged images never count as kept: an OOD-flagged wrong call at
    # 0.999 in every shift must not move anything.
    pairs, truth, shifts, flagged = [], [], [], []
    for s in range(10):
        pairs += [(3, 0.95)] + [(3, 0.99)] * 20 + [(1, 0.9)] * 78 + [(0, 0.999)]
        truth += [2] + [3] * 20 + [1] * 78 + [1]
        shifts += [f"s{s}"] * 100
        flagged += [False] * 99 + [True]
    p, truth, shifts, flagged = _probs(pairs), np.array(truth), np.array(shifts), np.array(flagged)
    clean = _probs([(3, 0.96)] * 10 + [(3, 0.999)] * 30 + [(0, 0.9)] * 10)
    pooled = per_class_review(p, truth, flagged, class_names=NAMES, floor=0.85, target_risk=0.02, fitted_on="x")
    assert pooled["thresholds"]["Pro-B"] == pytest.approx(0.99)
    rec = each_shift_review(p, truth, flagged, shifts, clean_probs=clean, clean_flagged=None, class_names=NAMES,
                            floor=0.85, target_risk=0.02, fitted_on="x")
    # every shift holds at the floor: Pro-B comes down to it (Early Pre-B stays at its lowest observed confidence,
    # 0.9, where the pooled rule put it: no image lies between it and the floor)
    assert rec["thresholds"] == {"Benign": 0.85, "Early Pre-B": 0.9, "Pre-B": 0.85, "Pro-B": 0.85}
    assert max(_silent_per_shift(p, truth, flagged, shifts, rec["thresholds"]).values()) == 0.01
    assert rec["clean_reviewed"] == 0 and rec["worst_shift"]["silent_error_rate"] == 0.01
    assert rec["kept_images"]["Benign"] == 0  # the flagged calls


def test_each_shift_review_trades_one_class_for_another_and_says_when_it_cannot_hold():
    from cadbcnn_runtime.calibration import each_shift_review

    # one shift, budget 2 of 100: Benign calls wrong at 0.96 (2) and Pro-B calls wrong at 0.93 (2) — one class must
    # be raised. Raising Benign reviews 30 clean Benign calls at 0.97, raising Pro-B 5 clean Pro-B calls at 0.94:
    # the rule raises Pro-B.
    pairs = [(0, 0.96)] * 2 + [(3, 0.93)] * 2 + [(0, 0.999)] * 48 + [(3, 0.999)] * 48
    truth = np.array([1, 1, 2, 2] + [0] * 48 + [3] * 48)
    shifts = np.array(["s"] * 100)
    clean = _probs([(0, 0.97)] * 30 + [(3, 0.94)] * 5)
    rec = each_shift_review(_probs(pairs), truth, None, shifts, clean_probs=clean, clean_flagged=None,
                            class_names=NAMES, floor=0.9, target_risk=0.02, fitted_on="x")
    assert rec["thresholds"]["Benign"] == 0.9 and rec["thresholds"]["Pro-B"] == pytest.approx(0.999)
    assert rec["clean_reviewed"] == 5 and rec["achieved"]
    # a wrong call at confidence 1.0 cannot be reviewed by any threshold: not achieved, said so
    pairs = [(0, 1.0)] * 5 + [(0, 0.999)] * 95
    rec = each_shift_review(_probs(pairs), np.array([1] * 5 + [0] * 95), None, np.array(["s"] * 100),
                            clean_probs=clean, clean_flagged=None, class_names=NAMES, floor=0.9, target_risk=0.02,
                            fitted_on="x")
    assert not rec["achieved"] and rec["worst_shift"]["silent_error_rate"] == 0.05
