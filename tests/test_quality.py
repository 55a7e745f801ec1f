"""Field-content check: blank or near-uniform fields always need review (torch-free; marker `runtime`)."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.cli import app
from cadbcnn_runtime.quality import content_scores, fit_quality
from cadbcnn_runtime.respec import replace_spec
from test_hardening import png

pytestmark = pytest.mark.runtime


def blank_fields(size=64, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for level in (0, 30, 128, 200, 245, 255):
        for tint in ((0, 0, 0), (20, -10, -15), (-25, 5, 30)):
            for noise in (0, 10, 25):
                f = np.clip(np.float32(level) + np.array(tint, np.float32) + rng.normal(0, noise, (size, size, 3)),
                            0, 255).astype(np.uint8)
                out.append(f)
    return out


def structured(size=64, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 225, np.uint8)
    for _ in range(6):
        cx, cy, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 9))]
        yy, xx = np.mgrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (120, 60, 160)
    return img


def test_uniform_fields_score_near_zero_and_structure_does_not():
    blanks = content_scores(np.stack([f.transpose(2, 0, 1) for f in blank_fields()]))
    assert blanks.max() < 3.0
    cells = content_scores(np.stack([structured(seed=s).transpose(2, 0, 1) for s in range(5)]))
    assert cells.min() > 10.0
    as_float = content_scores(np.stack([structured().transpose(2, 0, 1)]).astype(np.float32) / 255)
    assert as_float[0] == pytest.approx(cells[0], rel=1e-4)  # float [0, 1] inputs give the same score


def test_fit_quality_rule():
    q = fit_quality(np.linspace(10, 50, 1001), fitted_on="training split (1001 images)")
    assert q["min_content"] == pytest.approx(0.5 * np.quantile(np.linspace(10, 50, 1001), 0.001))
    assert q["fitted_min"] == 10 and "training split" in q["rule"]
    with pytest.raises(ValueError):
        fit_quality(np.array([]), fitted_on="nothing")


def _with_quality(onnx_model, dst, min_content=5.0):
    spec = ModelSpec.from_onnx(onnx_model).replace(quality={"measure": "test", "min_content": min_content})
    dst.write_bytes(replace_spec(onnx_model.read_bytes(), spec))  # re-stamped, as the exporter would
    return dst


def test_blank_fields_always_need_review(onnx_model, tmp_path):
    model = _with_quality(onnx_model, tmp_path / "q.onnx")
    with Classifier.from_file(model, device="cpu", review_threshold=0.0) as clf:  # confidence alone never reviews
        for p in clf.predict_batch(blank_fields()):
            assert p.low_content and p.needs_review and p.content_score < 5.0
        p = clf.predict(structured())
        assert not p.low_content and not p.needs_review
    d = tmp_path / "in"
    png(d / "noise.png", size=64)
    d.joinpath("blank.png").write_bytes(__import__("cv2").imencode(".png", blank_fields()[0])[1].tobytes())
    r = CliRunner().invoke(app, [str(d), "--model", str(model), "--out", str(tmp_path / "r.csv"), "-q"])
    assert r.exit_code == 0 and "1 blank or near-uniform" in r.output, r.output
    rows = {row["path"]: row for row in csv.DictReader((tmp_path / "r.csv").open())}
    assert rows["blank.png"]["low_content"] == "True" and rows["blank.png"]["needs_review"] == "True"
    assert rows["noise.png"]["low_content"] == "False"


def test_replace_spec_keeps_the_graph_and_restamps(onnx_model, tmp_path):
    from cadbcnn_runtime._onnxmeta import content_digest

    data = onnx_model.read_bytes()
    spec = ModelSpec.from_onnx(onnx_model)
    new = replace_spec(data, spec.replace(review_threshold=0.42))
    assert content_digest(new, "x") == content_digest(data, "x")  # every non-metadata byte unchanged
    (tmp_path / "n.onnx").write_bytes(new)
    with Classifier.from_file(tmp_path / "n.onnx", device="cpu") as a, Classifier.from_file(onnx_model) as b:
        x = np.stack([structured(seed=s).transpose(2, 0, 1) for s in range(3)])
        assert a.spec.review_threshold == 0.42 and np.array_equal(a.run(x), b.run(x))


def test_calibrate_model_torch_free(onnx_model, tmp_path):
    from cadbcnn_runtime.respec import calibrate_model

    d = tmp_path / "imgs"
    val, train = [], []
    for i in range(24):
        val.append((png(d / f"v{i}.png", seed=i, size=64), i % 4))
        train.append(png(d / f"t{i}.png", seed=100 + i, size=64))
    spec = calibrate_model(onnx_model, tmp_path / "cal.onnx", val=val, train=train, log=lambda *a: None)
    loaded = ModelSpec.from_onnx(tmp_path / "cal.onnx")
    assert loaded.calibration["temperature"] == spec.calibration["temperature"] > 0
    assert loaded.quality["min_content"] > 0 and 0 < loaded.review_threshold <= 1
    with Classifier.from_file(tmp_path / "cal.onnx", device="cpu") as clf:
        assert clf.temperature == spec.calibration["temperature"]


def test_content_scores_are_the_blurred_luminance_std_without_a_blas_call(monkeypatch):
    """The luma sum is elementwise (a BLAS call wakes OpenBLAS's spinning pool and slows the next ORT run)."""
    import cv2

    from cadbcnn_runtime import quality

    x = np.random.default_rng(0).integers(0, 256, (3, 3, 40, 48), dtype=np.uint8)
    luma = 0.299 * x[:, 0].astype(np.float64) + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    ref = [cv2.GaussianBlur(im.astype(np.float32), (0, 0), quality.SIGMA).std() for im in luma]

    def no_blas(*a, **k):
        raise AssertionError("content_scores must not call BLAS")

    for name in ("tensordot", "dot", "einsum", "inner"):
        monkeypatch.setattr(quality.np, name, no_blas)
    np.testing.assert_allclose(quality.content_scores(x), ref, rtol=1e-4)
    np.testing.assert_allclose(quality.content_scores(x.astype(np.float32) / 255), ref, rtol=1e-4)
