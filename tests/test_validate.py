"""`cadbcnn-infer validate FOLDER` (#14 item 1): torch-free, labelled / unlabelled / healthy, the verdict rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cadbcnn_runtime import ModelSpec
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.validate import DO_NOT_USE, FINE_TUNE, REFIT, RULES, USABLE, rule_text, scan, verdict
from conftest import make_dataset

pytestmark = pytest.mark.runtime


def _stats(**kw):
    base = {"n": 200, "accuracy": 0.995, "review_rate": 0.03, "ood_rate": 0.01, "silent_error_rate": 0.0,
            "healthy": False}
    return {**base, **kw}


@pytest.mark.parametrize("stats, expected, rule", [
    (_stats(), USABLE, 5),
    (_stats(silent_error_rate=0.03, accuracy=0.9), DO_NOT_USE, 1),
    (_stats(accuracy=0.9, silent_error_rate=0.01), FINE_TUNE, 2),
    (_stats(review_rate=0.4, ood_rate=0.35), REFIT, 3),
    (_stats(review_rate=0.4, ood_rate=0.02), FINE_TUNE, 4),
    # the appearance check is refitted by refit-ood too: its flags count with the OOD flag's
    (_stats(review_rate=0.16, ood_rate=0.04, site_flag_rate=0.09), REFIT, 3),
    (_stats(review_rate=0.16, ood_rate=0.04, site_flag_rate=0.06), FINE_TUNE, 4),
    (_stats(silent_error_rate=0.01), FINE_TUNE, 4),
    (_stats(accuracy=None, silent_error_rate=None, ood_rate=0.5, review_rate=0.5), REFIT, 3),
    (_stats(accuracy=None, silent_error_rate=None), USABLE, 5),
    (_stats(n=RULES["min_images"] - 1), None, 0),
])
def test_the_verdict_rule_both_ways(stats, expected, rule):
    assert verdict(stats) == (expected, rule)
    assert len(rule_text()) == 6 and (expected is None or expected in rule_text()[rule])


def test_scan_labels_maps_and_refuses_unknown_folders(tmp_path):
    names, folders = ("Benign", "Early Pre-B", "Pre-B", "Pro-B"), ("Benign", "Early", "Pre", "Pro")
    make_dataset(tmp_path / "lab", per_class=2, size=32, classes=("healthy", "Pro"))
    with pytest.raises(ArgumentError, match="--class-map LOCAL=CLASS"):
        scan(tmp_path / "lab", names, folders)
    s = scan(tmp_path / "lab", names, folders, class_map={"healthy": "Benign"})
    assert sorted(s.truth.tolist()) == [0, 0, 3, 3] and s.folders == {"healthy": "Benign", "Pro": "Pro-B"}
    with pytest.raises(ArgumentError, match="not one of the model's classes"):
        scan(tmp_path / "lab", names, folders, class_map={"healthy": "Normal"})
    flat = tmp_path / "flat"
    make_dataset(flat, per_class=2, size=32, classes=("x",))
    for p in (flat / "x").iterdir():
        p.rename(flat / p.name)
    s = scan(flat, names, folders)
    assert s.truth is None and len(s.paths) == 2
    assert scan(flat, names, folders, healthy=True).healthy


def _cli(*args):
    code = "import sys; from cadbcnn_runtime.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_validate_labelled_and_unlabelled_torch_free(onnx_model, tmp_path):
    spec = ModelSpec.from_onnx(onnx_model)
    folders = spec.training.get("class_folders") or spec.class_names
    lab = make_dataset(tmp_path / "lab", per_class=10, size=spec.image_size[0], classes=folders)
    (lab / folders[0] / "broken.png").write_bytes(b"not an image")  # reported, never fatal
    r = _cli("validate", str(lab), "--model", str(onnx_model), "--out", str(tmp_path / "rep"), "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "verdict:" in r.stdout and "1 file(s) could not be read" in r.stderr
    res = json.loads((tmp_path / "rep" / "validation.json").read_text())
    assert res["kind"] == "labelled" and res["stats"]["n"] == 40 and len(res["unreadable"]) == 1
    assert res["verdict"] in (USABLE, REFIT, FINE_TUNE, DO_NOT_USE) and res["verified"]
    assert set(res["per_class"]) <= set(spec.class_names) and "ece" in res["calibration"]
    md = (tmp_path / "rep" / "validation.md").read_text()
    assert "## The verdict rule" in md and f"**Verdict: {res['verdict']}**" in md and "broken.png" in md
    assert res["model"]["backend"] == "onnxruntime" and "onnxruntime); review below" in md
    # the random-weight model is wrong on most images: the rule must not call it usable
    assert res["stats"]["accuracy"] < 0.97 and res["verdict"] in (FINE_TUNE, DO_NOT_USE)
    # unlabelled: no errors measured, verdict unverified
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((lab / folders[1]).glob("*.png")):
        p.rename(flat / p.name)
    code = ("import sys\nfrom cadbcnn_runtime.validate import validate\n"
            f"r = validate({str(onnx_model)!r}, {str(flat)!r}, {str(tmp_path / 'rep2')!r}, figures=False)\n"
            "assert r['kind'] == 'unlabelled' and r['stats']['silent_errors'] is None and not r['verified']\n"
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'not torch-free'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_validate_refuses_bad_arguments_before_any_work(onnx_model, tmp_path):
    r = _cli("validate", str(tmp_path / "nowhere"), "--model", str(onnx_model), "--no-figures")
    assert r.returncode == 2 and "folder not found" in r.stderr
    r = _cli("validate", str(tmp_path), "--model", str(onnx_model), "--class-map", "healthy", "--no-figures")
    assert r.returncode == 2 and "LOCAL_FOLDER=CLASS" in r.stderr
    r = _cli("validate", str(tmp_path), "--model", str(onnx_model), "--backend", "tensorrt", "--no-figures")
    assert r.returncode == 2 and "tensorrt" in r.stderr
    assert not (tmp_path.parent / f"{tmp_path.name}_validation").exists()


def test_validate_healthy_set_counts_malignant_labels(onnx_model, tmp_path):
    from cadbcnn_runtime.validate import validate

    spec = ModelSpec.from_onnx(onnx_model)
    flat = tmp_path / "healthy"
    make_dataset(tmp_path / "tmp", per_class=8, size=spec.image_size[0], classes=("a", "b", "c", "d"))
    flat.mkdir()
    for p in sorted((tmp_path / "tmp").rglob("*.png")):
        p.rename(flat / p.name)
    r = validate(onnx_model, flat, tmp_path / "rep", healthy=True, figures=False)
    s = r["stats"]
    predicted_malignant = sum(v for k, v in r["predicted"].items() if k != "Benign")
    assert r["kind"] == "healthy" and s["malignant_rate"] == pytest.approx(predicted_malignant / 32)
    silent = sum(1 for row in r["images"] if row["label"] != "Benign" and not row["needs_review"])
    assert s["silent_errors"] == silent and r["verified"] and len(r["images"]) == 32
