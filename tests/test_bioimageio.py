"""bioimage.io packaging (`cadbcnn_export.bioimageio`, `cadbcnn-package`): build → bioimageio.core test, and
the test catching a corrupted expected output or a wrong weights hash; the package's numbers against the
runtime's. One package is built per module (the 64-px model is 133 MB, so variants share its weights file)."""

from __future__ import annotations

import hashlib
import shutil
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnx")

from cadbcnn_export.bioimageio import (PACKAGE_METADATA_KEY, PROBABILITIES, build_package,  # noqa: E402
                                       probability_graph, test_package)
from cadbcnn_runtime.classifier import Classifier  # noqa: E402
from cadbcnn_runtime.errors import ModelSpecError  # noqa: E402
from cadbcnn_runtime.reliability import softmax  # noqa: E402
from cadbcnn_runtime.spec import METADATA_KEY, ModelSpec  # noqa: E402

TEMPERATURE = 0.5


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """Four small images of different colours (PNG and JPEG), each with a dark 'cell'."""
    d = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(1)
    for i, colour in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]):
        img = np.clip(np.array(colour, np.float32) + rng.normal(0, 12, (80, 96, 3)), 0, 255).astype(np.uint8)
        cv2.circle(img, (40 + 4 * i, 40), 14, (40, 20, 80), -1)
        cv2.imwrite(str(d / f"c{i}-{i + 1:03d}.{'png' if i % 2 else 'jpg'}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return d


@pytest.fixture(scope="module")
def ood_model(onnx_model, tmp_path_factory) -> Path:
    """The 64-px test model with a calibration temperature and a stand-in OOD output (mean squared logit),
    re-stamped so that the runtime accepts it — exercises both package outputs and the division by T."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cadbcnn_runtime.respec import replace_spec

    proto = onnx.load(str(onnx_model))
    g = proto.graph
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), name="toy_ood.axes"))
    g.node.extend([helper.make_node("Mul", ["logits", "logits"], ["toy_ood.sq"], name="toy_ood/Mul"),
                   helper.make_node("ReduceMean", ["toy_ood.sq", "toy_ood.axes"], ["ood_score"],
                                    name="toy_ood/ReduceMean", keepdims=0)])
    g.output.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))
    spec = ModelSpec.from_onnx(onnx_model).replace(
        ood={"output": "ood_score", "method": "toy mean squared logit", "threshold": 0.5},
        calibration={"method": "temperature", "temperature": TEMPERATURE})
    out = tmp_path_factory.mktemp("ood-model") / "model.onnx"
    out.write_bytes(replace_spec(proto.SerializeToString(), spec))
    return out


@pytest.fixture(scope="module")
def package(ood_model, samples, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pkg") / "cadbcnn-test.zip"
    return out, build_package(ood_model, out, samples=samples)


@pytest.fixture(scope="module")
def unpacked(package, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(package[0]) as z:
        z.extractall(d)
    return d


def _variant(unpacked: Path, dest: Path) -> Path:
    """A copy of the unpacked package (the weights file linked, not copied); returns its rdf.yaml."""
    dest.mkdir()
    for p in unpacked.iterdir():
        if p.name == "weights.onnx":
            (dest / p.name).symlink_to(p)
        else:
            shutil.copyfile(p, dest / p.name)
    return dest / "rdf.yaml"


def test_round_trip_passes_bioimageio_test(package, unpacked):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    zip_path, summary = package
    passed, text = test_package(zip_path)
    assert passed, text
    assert "[passed] Reproduce test outputs from test inputs (onnx)" in text

    descr = load_description(zip_path)
    assert isinstance(descr, v0_5.ModelDescr), descr
    assert [str(t.id) for t in descr.inputs] == ["image"]
    image = descr.inputs[0]
    assert image.dtype == "uint8" and [str(a.id) for a in image.axes] == ["batch", "channel", "y", "x"]
    assert image.axes[1].channel_names == ["r", "g", "b"] and image.axes[2].size == image.axes[3].size == 64
    assert [str(t.id) for t in descr.outputs] == [PROBABILITIES, "ood_score"]
    assert descr.outputs[0].axes[1].channel_names == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert [a.type for a in descr.outputs[1].axes] == ["batch"]
    weights = (unpacked / "weights.onnx").read_bytes()
    assert str(descr.weights.onnx.sha256) == summary["weights_sha256"] == _sha256(weights)
    assert summary["sha256"] == _sha256(zip_path.read_bytes())
    tol = {str(t.output_ids[0]): t for t in descr.config.bioimageio.reproducibility_tolerance}
    assert set(tol) == {PROBABILITIES, "ood_score"} and tol[PROBABILITIES].absolute_tolerance == 1e-3
    assert descr.license == "Apache-2.0" and "image-classification" in descr.tags
    assert any(c.doi is not None and str(c.doi) == "10.34740/KAGGLE/DSV/2175623" for c in descr.cite)
    assert descr.config.model_extra["cadbcnn"]["temperature"] == TEMPERATURE

    cover = cv2.imread(str(unpacked / "cover.png"))
    assert cover.shape[1] == 2 * cover.shape[0] and (unpacked / "cover.png").stat().st_size <= 500_000
    doc = (unpacked / "README.md").read_text(encoding="utf-8")
    assert "\n# Validation\n" in doc and "not a medical device" in doc.lower()


def test_package_numbers_equal_the_runtime(package, unpacked, ood_model, samples):
    """The package's ONNX file, run on the runtime's preprocessing of the same images, gives the runtime's
    calibrated probabilities and OOD scores; the test tensors are exactly those inputs and outputs."""
    import onnxruntime as ort

    _, summary = package
    images = sorted(samples.iterdir())
    with Classifier.from_file(ood_model, device="cpu") as clf:
        x = np.stack([clf.preprocess(p) for p in images])
        preds = clf.predict_batch(images)
        logits, _ = clf.run_all(x)
        names = clf.spec.class_names
    assert [p.name for p in images] == summary["test_images"]
    ref = np.array([[p.probabilities[n] for n in names] for p in preds])
    assert np.abs(ref - softmax(logits, TEMPERATURE)).max() < 1e-12      # the runtime really applies T
    assert np.abs(ref - softmax(logits)).max() > 1e-3                     # … and T matters here

    sess = ort.InferenceSession(str(unpacked / "weights.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [PROBABILITIES, "ood_score"]
    probs, ood = sess.run(None, {"image": x})
    assert np.abs(probs - ref).max() <= 1e-5
    assert np.abs(ood - np.array([p.ood_score for p in preds])).max() <= 1e-5
    np.testing.assert_array_equal(np.load(unpacked / "test_input_image.npy"), x)
    assert np.abs(np.load(unpacked / f"test_output_{PROBABILITIES}.npy") - ref).max() <= 1e-5
    assert np.abs(np.load(unpacked / "test_output_ood_score.npy") - ood).max() == 0
    assert summary["predictions"] == [p.label for p in preds]


def test_corrupted_expected_output_fails(unpacked, tmp_path):
    """A changed expected output (its sha256 updated, so only the reproduction check can catch it) fails."""
    rdf = _variant(unpacked, tmp_path / "pkg")
    npy = rdf.parent / f"test_output_{PROBABILITIES}.npy"
    old = _sha256(npy.read_bytes())
    arr = np.load(npy)
    np.save(npy, arr[:, ::-1].copy())  # classes reversed: still probabilities, not the model's
    rdf.write_text(rdf.read_text().replace(old, _sha256(npy.read_bytes())))
    passed, text = test_package(rdf)
    assert not passed, text
    assert "[failed] Reproduce test outputs from test inputs (onnx)" in text
    assert "disagree with expected values" in text


def test_wrong_weights_sha256_fails(unpacked, package, tmp_path):
    rdf = _variant(unpacked, tmp_path / "pkg")
    text = rdf.read_text()
    good = package[1]["weights_sha256"]
    assert text.count(good) == 1
    wrong = _sha256(b"not these weights")  # (all-digit strings would be YAML integers: keep a real hex digest)
    rdf.write_text(text.replace(good, wrong))
    passed, summary = test_package(rdf)
    assert not passed, summary
    assert f"SHA256 mismatch for {rdf.parent / 'weights.onnx'}. Expected {wrong}, got {good}" in summary


def test_plain_model_graph_and_runtime_refusal(onnx_model, samples):
    """Uncalibrated model without OOD output: one output, softmax(logits) with T = 1; the source metadata is
    kept, and the runtime refuses the derived graph (its integrity stamp covers the source graph)."""
    import onnxruntime as ort

    with Classifier.from_file(onnx_model, device="cpu") as clf:
        spec = clf.spec
        x = np.stack([clf.preprocess(p) for p in sorted(samples.iterdir())])
        logits = clf.run(x)
    proto = probability_graph(onnx_model, spec, source_sha256="ab" * 32)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ModelSpec.from_json(meta[METADATA_KEY]) == spec
    assert '"sha256": "' + "ab" * 32 in meta[PACKAGE_METADATA_KEY]
    data = proto.SerializeToString()
    del proto
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [PROBABILITIES]
    (probs,) = sess.run(None, {spec.input_name: x})
    assert np.abs(probs - softmax(logits)).max() <= 1e-5
    with pytest.raises(ModelSpecError, match="integrity check failed"):
        Classifier.from_bytes(data, device="cpu")


def test_cli_missing_model_exits_2(tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_export.package_cli import app

    out = tmp_path / "pkg.zip"
    r = CliRunner().invoke(app, [str(tmp_path / "missing.onnx"), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "model file not found" in r.output and "cadbcnn-export" in r.output
    assert not out.exists()


def test_cli_without_the_extra_exits_2(onnx_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cadbcnn_export.package_cli import app

    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # `import bioimageio.spec` raises ImportError
    out = tmp_path / "pkg.zip"
    r = CliRunner().invoke(app, [str(onnx_model), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "pip install 'cadbcnn[bioimageio]'" in r.output and "bioimageio.spec" in r.output
    assert not out.exists()


def test_cover_review_flag_is_the_runtimes_whole_rule(ood_model, samples, tmp_path, monkeypatch):
    """The cover's 'needs review' is the runtime's ``needs_review``, not confidence/OOD alone: a model whose only
    active check is the field-content check (review threshold 0, OOD threshold out of reach, every field 'blank')
    shows the first image as needing review."""
    import cadbcnn_export.bioimageio as bi
    from cadbcnn_runtime.respec import replace_spec

    spec = ModelSpec.from_onnx(ood_model)
    spec = spec.replace(review_threshold=0.0, ood={**spec.ood, "threshold": 1e30},
                        quality={"measure": "test", "min_content": 1e9})
    model = tmp_path / "blank-only.onnx"
    model.write_bytes(replace_spec(ood_model.read_bytes(), spec))
    seen = {}
    real = bi._cover

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bi, "_cover", spy)
    build_package(model, tmp_path / "p.zip", samples=samples, test=False)
    first = sorted(p for p in samples.iterdir())[0]
    with Classifier.from_file(model, device="cpu") as clf:
        pred = clf.predict(first)
    assert pred.low_content and not pred.out_of_distribution and pred.needs_review
    assert seen["review"] is True and seen["is_ood"] is False
