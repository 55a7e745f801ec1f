"""`cadbcnn-train shift-report`: silent errors on shifted, blank and external image sets."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier
from cadbcnn_train import data as D
from cadbcnn_train import shift_report as S
from cadbcnn_train.cli import app as train_app
from conftest import make_dataset

MILD = {"gaussian blur σ=1.5", "JPEG quality 30", "zoom ×1.3", "hue +10°", "hue −10°"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic dataset with a seed-0 stratified split, a healthy and a labelled external folder."""
    d = tmp_path_factory.mktemp("shift")
    data = make_dataset(d / "data", per_class=12, size=48)
    ds = D.load(data, cache=False)
    D.write_split_csv(d / "split.csv", ds.root, ds.samples, D.make_split(ds.samples, seed=0), ds.class_folders)
    healthy = d / "healthy"
    for i, src in enumerate(sorted(make_dataset(d / "h", per_class=3, seed=1).rglob("*.png"))):
        dest = healthy / ("fields" if i % 2 else "cells/deeper") / src.name  # searched recursively
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (healthy / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    labelled = make_dataset(d / "labelled", per_class=2, seed=2)
    (labelled / "Early" / "Early-000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorts first in its class
    return data, d / "split.csv", healthy, labelled


@pytest.fixture(scope="module")
def report(run, onnx_model, tmp_path_factory):
    """One CLI run over every kind of set, with the review threshold forced to 0 (the test model has no OOD
    output, so nothing is reviewed and every wrong or malignant label is silent). Records the labels each set
    was scored against."""
    data, split_file, healthy, labelled = run
    out = tmp_path_factory.mktemp("report") / "rep"
    truths, real = [], S.set_result

    def spy(outputs, truth, **kwargs):
        truths.append(truth)
        return real(outputs, truth, **kwargs)

    original = Classifier.from_file.__func__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Classifier, "from_file",
                   classmethod(lambda cls, *a, **k: original(cls, *a, **{**k, "review_threshold": 0.0})))
        mp.setattr(S, "set_result", spy)
        r = CliRunner().invoke(train_app, ["shift-report", str(onnx_model), "--data", str(data), "--split-file",
                                           str(split_file), "--external", f"{healthy}:healthy",
                                           "--external", str(labelled), "--out", str(out), "--predictions"])
    assert r.exit_code == 0, r.output
    return json.loads((out / "shift_report.json").read_text()), out, r.output, truths


def test_every_shift_keeps_uint8_rgb_and_is_deterministic():
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for s in S.SHIFTS:
        a = s.apply(img, S.image_rng(7, s.name, 3))
        b = s.apply(img, S.image_rng(7, s.name, 3))
        assert a.shape == img.shape and a.dtype == np.uint8, s.name
        np.testing.assert_array_equal(a, b, err_msg=s.name)
    from cadbcnn_train.transforms import hed_jitter, sensor_noise
    for f in (hed_jitter, sensor_noise):  # the random ones change with the seed
        assert not np.array_equal(f(img, S.image_rng(0, "x", 0)), f(img, S.image_rng(1, "x", 0)))


def test_scalebar_sets_swap_only_the_corner_from_another_class_deterministically():
    from cadbcnn_train.transforms import scalebar_box

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 60, 3), dtype=np.uint8) for _ in range(9)]
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
    donors = S.scalebar_donors(truth, seed=5)
    assert (truth[donors] != truth).all()                            # always another class
    np.testing.assert_array_equal(donors, S.scalebar_donors(truth, seed=5))
    assert not np.array_equal(donors, S.scalebar_donors(truth, seed=6))
    assert (S.scalebar_donors(np.zeros(4, int), seed=0) == -1).all()  # one class only: nothing to swap
    box = scalebar_box(50, 60)
    for img, out, j in zip(images, S.swapped_scalebars(images, donors), donors):
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out[box], images[j][box])      # the donor's corner …
        rest = np.ones(img.shape[:2], bool)
        rest[box] = False
        np.testing.assert_array_equal(out[rest], img[rest])          # … and nothing else changed
    covered = S.erase_scalebar(images[0])
    assert (covered[box] == covered[box][0, 0]).all()


def test_donor_shift_counts_labels_that_follow_the_pasted_corner():
    from cadbcnn_runtime.evaluation import Outputs

    truth = np.array([0, 1, 2, 3])
    donors = np.array([1, 0, 3, 2])  # donor classes 1, 0, 3, 2

    def outs(index, review):
        return Outputs(np.array(index), np.ones(4), np.array(review, bool), None, np.zeros((4, 4)))

    clean = outs([0, 1, 2, 3], [0, 0, 0, 0])
    swapped = outs([1, 1, 3, 3], [0, 0, 1, 0])  # images 0 and 2 moved to their donor's class, 2 reviewed
    r = S.donor_shift(swapped, clean, truth, donors)
    assert r == {"moved_to_donor_class": 0.5, "moved_to_donor_class_silent": 0.25}
    assert S.donor_shift(clean, clean, truth, donors)["moved_to_donor_class"] == 0.0


def test_severity_groups():
    assert {s.name for s in S.SHIFTS if s.severity == "mild"} == MILD
    assert {s.severity for s in S.SHIFTS} == {"mild", "strong"} and len({s.name for s in S.SHIFTS}) == len(S.SHIFTS)


def test_blank_fields_are_uniform_and_deterministic():
    plain = S.blank_fields((24, 32), noise=False)
    noisy = S.blank_fields((24, 32), noise=True, seed=3)
    assert len(plain) + len(noisy) == 100
    assert all(f.shape == (24, 32, 3) and f.dtype == np.uint8 and (f == f[0, 0]).all() for f in plain)
    assert {int(f[0, 0, 0]) for f in plain[:len(S.GREY_LEVELS)]} >= {0, 255}
    assert all(np.array_equal(a, b) for a, b in zip(noisy, S.blank_fields((24, 32), noise=True, seed=3)))
    assert np.abs(noisy[5].astype(int) - plain[5]).std() > 5


def test_external_folder_parsing(run, tmp_path):
    _, _, healthy, labelled = run
    assert S.parse_external(f"{healthy}:healthy") == (healthy, True) and S.parse_external(str(healthy)) == (healthy, False)
    folders = ("Benign", "Early", "Pre", "Pro")
    lab = S.scan_external(labelled, False, folders)
    assert lab.truth is not None and sorted(set(lab.truth)) == [0, 1, 2, 3]
    assert S.scan_external(labelled, True, folders).truth is None  # :healthy wins over sub-folder names
    assert S.scan_external(healthy, False, folders).truth is None  # sub-folders are not class folders
    assert len(S.scan_external(healthy, True, folders).files) == 13  # 12 images + broken.jpg, recursively


def test_limit_is_deterministic():
    rows = [{"path": str(i)} for i in range(100)]
    assert S.subsample(rows, 7) == S.subsample(rows, 7) and len(S.subsample(rows, 7)) == 7
    assert S.subsample(rows, None) == rows and S.subsample(rows, 500) == rows


def test_report_files_and_fields(run, report):
    _, split_file, _, _ = run
    rep, out, output, truths = report
    assert {p.name for p in out.iterdir()} == {"shift_report.json", "shift_report.md", "reliability.png",
                                               "risk_coverage.png", "predictions.csv"}
    assert all((out / f).stat().st_size > 5000 for f in ("reliability.png", "risk_coverage.png"))
    n_test = sum(1 for row in D.split_rows(split_file) if row["split"] == "test")
    clean = rep["sets"]["clean test split"]
    assert clean["n"] == n_test and rep["review_threshold"] == 0.0 and rep["ood_threshold"] is None
    assert clean["silent_errors"] == round(n_test * (1 - clean["accuracy"]))  # nothing reviewed: every error
    for s in S.SHIFTS:
        got = rep["sets"][s.name]
        assert got["n"] == n_test and got["severity"] == s.severity and got["labelled"] and got["ece"] is not None
        assert {"accuracy", "review_rate", "ood_rate", "silent_error_rate", "accuracy_non_reviewed"} <= set(got)
    # the clean split and every shifted set were scored against the same labels
    labelled_truths = [t for t in truths if t is not None]
    assert len(labelled_truths) == 1 + len(S.SHIFTS) + 2 + 1  # clean, shifts, scale-bar sets, labelled external
    for t in labelled_truths[1:-1]:
        np.testing.assert_array_equal(t, labelled_truths[0])
    for key in ("nll", "brier", "ece", "aurc", "reliability_bins", "risk_coverage", "operating_point"):
        assert key in rep["clean"]
    blank = rep["sets"]["blank / uniform fields"]
    assert blank["healthy"] and blank["n"] == 50 and rep["sets"]["blank / uniform fields + sensor noise σ=10"]["n"] == 50
    lab = rep["sets"]["external: labelled (labelled)"]
    assert lab["labelled"] and lab["n"] == 8 and lab["unreadable"] == 1
    for name in (S.SCALEBAR_COVERED, S.SCALEBAR_SWAPPED):
        got = rep["sets"][name]
        assert got["n"] == n_test and got["severity"] == "shortcut" and got["labelled"]
    moved = rep["sets"][S.SCALEBAR_SWAPPED]["moved_to_donor_class"]
    assert 0 <= moved <= 1 and rep["sets"][S.SCALEBAR_SWAPPED]["moved_to_donor_class_silent"] <= moved
    assert set(rep["summary"]) == {"mild", "strong", "shortcut", "blank", "external"}
    md = (out / "shift_report.md").read_text()
    assert S.SCALEBAR_SWAPPED in md and "A model that does not read the scale bar scores 0" in md
    assert "Silent error" in md and "zoom ×1.3" in md and "1 unreadable" in md and md in output
    assert rep["temperature"] == 1.0 and rep["calibration"] is None and "T = 1" in md


def test_predictions_csv_has_every_image_of_every_set_and_agrees_with_the_report(report):
    """predictions.csv (--predictions) holds one row per image of every set; counting its rows again gives the
    report's n, accuracy, review rate and silent errors of each set, and its truths are the report's labels."""
    import csv

    rep, out, _, truths = report
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    names = rep["class_names"]
    assert list(rows[0])[:len(S.PREDICTION_COLUMNS)] == list(S.PREDICTION_COLUMNS)
    assert list(rows[0])[len(S.PREDICTION_COLUMNS):] == [f"p_{n}" for n in names]
    by_set: dict[str, list[dict]] = {}
    for row in rows:
        by_set.setdefault(row["set"], []).append(row)
    assert set(by_set) == set(rep["sets"])
    for name, got in rep["sets"].items():
        r = by_set[name]
        assert len(r) == got["n"] and [int(x["image"]) for x in r] == list(range(got["n"]))
        assert {x["severity"] for x in r} == {got["severity"]} and {x["kind"] for x in r} == {got["kind"]}
        review = [x["needs_review"] == "1" for x in r]
        assert np.mean(review) == pytest.approx(got["review_rate"])
        for x in r:
            p = [float(x[f"p_{n}"]) for n in names]
            assert x["label"] == names[int(np.argmax(p))] and float(x["confidence"]) == pytest.approx(max(p))
            assert x["ood_score"] == "" and x["out_of_distribution"] == ""  # the test model has no OOD output
        if got["labelled"]:
            wrong = [x["label"] != x["truth"] for x in r]
            assert np.mean([not w for w in wrong]) == pytest.approx(got["accuracy"])
            assert sum(w and not v for w, v in zip(wrong, review)) == got["silent_errors"]
        else:
            assert {x["truth"] for x in r} == {""}
        if got["healthy"]:
            assert {x["healthy"] for x in r} == {"1"}
            assert sum(x["label"] != "Benign" and x["needs_review"] == "0" for x in r) == got["silent_errors"]
    clean = [names[int(t)] for t in truths[0]]
    assert [x["truth"] for x in by_set["clean test split"]] == clean


def test_healthy_external_counts_malignant_labels_as_silent_errors(run, report, onnx_model):
    _, _, healthy, _ = run
    h = report[0]["sets"]["external: healthy (healthy)"]
    assert h["n"] == 12 and h["unreadable"] == 1 and h["unreadable_files"][0]["path"].endswith("broken.jpg")
    preds = Classifier.from_file(onnx_model, device="cpu").predict_batch(sorted(healthy.rglob("*.png")))
    malignant = sum(p.label != "Benign" for p in preds)
    assert malignant > 0 and h["review_rate"] == 0  # nothing reviewed: every malignant label is silent
    assert h["silent_errors"] == malignant and h["malignant_rate"] == pytest.approx(malignant / 12)
    assert h["silent_error_rate"] == pytest.approx(malignant / 12) and h["accuracy"] is None


def test_labelled_external_is_scored_against_its_folders(run, report, onnx_model):
    """Labels come from the class sub-folders and stay aligned past an unreadable file."""
    _, _, _, labelled = run
    files = sorted(p for p in labelled.rglob("*.png") if p.name != "Early-000.png")
    preds = Classifier.from_file(onnx_model, device="cpu").predict_batch(files)
    folder_of = dict(zip(("Benign", "Early Pre-B", "Pre-B", "Pro-B"), ("Benign", "Early", "Pre", "Pro")))
    correct = sum(folder_of[p.label] == f.parent.name for p, f in zip(preds, files))
    assert report[0]["sets"]["external: labelled (labelled)"]["accuracy"] == pytest.approx(correct / len(files))


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "dataset folder not found"),
    (["--external", "{tmp}/nowhere:healthy"], "external folder not found"),
    (["--split", "holdout"], "has no rows of split 'holdout'"),
])
def test_cli_exit_code_2_on_bad_input(run, onnx_model, tmp_path, args, message):
    data, split_file, _, _ = run
    base = {"--data": str(data), "--split-file": str(split_file), "--out": str(tmp_path / "o")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(tmp=tmp_path)
    r = CliRunner().invoke(train_app, ["shift-report", str(onnx_model), *[x for kv in base.items() for x in kv]])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o" / "shift_report.json").exists()


def test_markdown_names_per_class_thresholds(report):
    """A model whose calibration raises the review threshold per class says so (one number would be wrong)."""
    rep = json.loads(json.dumps(report[0]))
    names = rep["class_names"]
    rep["review_threshold"] = 0.5
    rep["calibration"] = {"method": "temperature", "temperature": 1.0,
                          "class_review": {"thresholds": {names[0]: 0.99}}}
    md = S.report_markdown(rep)
    assert f"the threshold of its label ({names[0]} 0.99, {names[1]} 0.5" in md
    rep["calibration"] = None
    assert "confidence < **0.50**" in S.report_markdown(rep)
