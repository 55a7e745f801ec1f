"""Runtime tests — torch-free: they run in the runtime-only environment too (marker `runtime`)."""

import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier, ImageError, ModelSpec, read_image
from cadbcnn_runtime.cli import app
from cadbcnn_runtime.errors import DeviceError, ModelLoadError, ModelSpecError
from cadbcnn_runtime.spec import METADATA_KEY

pytestmark = pytest.mark.runtime
runner = CliRunner()


def rgb(seed=0, h=60, w=70):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write(path: Path, img: np.ndarray, params=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 and img.shape[2] == 3 else img
    ok, buf = cv2.imencode(path.suffix if path.suffix.lower() != ".jpeg" else ".jpg", bgr, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def huge_png_header(w=20000, h=20000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"IEND"


@pytest.fixture(scope="module")
def clf(onnx_model):
    with Classifier.from_file(onnx_model, device="cpu") as c:
        yield c


@pytest.fixture
def messy(tmp_path):
    """A folder with good images of every kind and every kind of bad file."""
    d = tmp_path / "in"
    write(d / "good.jpg", rgb(1))
    write(d / "UPPER.JPEG", rgb(2))
    write(d / "grey.png", rgb(3)[:, :, 0])
    rgba = np.dstack([rgb(4), np.full((60, 70), 200, np.uint8)])
    write(d / "rgba.png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    write(d / "sixteen.tif", (rgb(5).astype(np.uint16) * 257))
    write(d / "blutkörperchen-é.bmp", rgb(6))
    (d / "zero.jpg").write_bytes(b"")
    full = cv2.imencode(".jpg", rgb(7))[1].tobytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is not an image")
    (d / "huge.png").write_bytes(huge_png_header())
    (d / "notes.txt").write_text("ignored: not an image suffix")
    outside = tmp_path / "outside.jpg"
    write(outside, rgb(8))
    os.symlink(outside, d / "escape.jpg")
    return d


GOOD = {"good.jpg", "UPPER.JPEG", "grey.png", "rgba.png", "sixteen.tif", "blutkörperchen-é.bmp"}
BAD = {"zero.jpg": "empty file", "truncated.jpg": "truncated JPEG", "text.jpg": "not a decodable image",
       "huge.png": "pixel limit", "escape.jpg": "symlink points outside"}


def test_read_image_conversions():
    assert read_image(rgb(0)[:, :, 0]).shape == (60, 70, 3)
    assert read_image(np.dstack([rgb(0), rgb(1)[:, :, :1]])).shape == (60, 70, 3)
    assert read_image(rgb(0).astype(np.uint16) * 257).dtype == np.uint8
    np.testing.assert_array_equal(read_image(rgb(0)), rgb(0))  # arrays are taken as RGB
    png = cv2.imencode(".png", cv2.cvtColor(rgb(0), cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(read_image(png), rgb(0))   # bytes are decoded to RGB
    with pytest.raises(ImageError, match="empty file"):
        read_image(b"")


def test_bad_inputs_raise_image_errors_naming_the_file(messy, clf, monkeypatch):
    for name, reason in BAD.items():
        if name == "escape.jpg":
            continue
        with pytest.raises(ImageError, match=reason) as e:
            clf.predict(messy / name)
        assert name in str(e.value)
    with pytest.raises(ImageError, match="file not found"):
        clf.predict(messy / "missing.jpg")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    import cadbcnn_runtime.decode as decode

    monkeypatch.setattr(decode.os, "open", deny)  # root ignores chmod, so simulate it
    with pytest.raises(ImageError, match="permission denied"):
        clf.predict(messy / "good.jpg")


def test_prediction_fields_and_review_threshold(onnx_model, clf):
    p = clf.predict(rgb(1))
    assert p.label == clf.spec.class_names[p.index]
    assert abs(sum(p.probabilities.values()) - 1) < 1e-6 and p.confidence == max(p.probabilities.values())
    assert p.needs_review == (p.confidence < clf.spec.review_threshold)
    with Classifier.from_file(onnx_model, device="cpu", review_threshold=1.0) as strict:
        assert strict.predict(rgb(1)).needs_review
    with Classifier.from_file(onnx_model, device="cpu", review_threshold=0.0) as lax:
        assert not lax.predict(rgb(1)).needs_review


def test_path_bytes_array_and_batch_agree(messy, clf):
    path = messy / "good.jpg"
    a = clf.predict(path)
    b = clf.predict(path.read_bytes())
    c = clf.predict(read_image(path))
    batch = clf.predict_batch([path, path.read_bytes(), messy / "grey.png"], batch_size=2)
    assert a == b == c == batch[0] == batch[1]


def test_thread_safety_8_threads_match_sequential(clf):
    images = [rgb(i, 64, 64) for i in range(24)]
    sequential = [clf.predict(im) for im in images]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(clf.predict, images))
    for s, c in zip(sequential, concurrent):
        assert s.index == c.index
        assert all(abs(s.probabilities[k] - c.probabilities[k]) < 1e-6 for k in s.probabilities)


def test_cli_classifies_good_files_and_reports_bad_ones(messy, onnx_model, clf):
    r = runner.invoke(app, [str(messy), "--model", str(onnx_model), "--quiet"])
    assert r.exit_code == 1, r.output  # some files unreadable → 1, results still written
    out = messy.parent / "in_predictions.csv"  # default: next to the folder
    import csv

    rows = {row["path"]: row for row in csv.DictReader(out.open(encoding="utf-8"))}
    assert set(rows) == GOOD | set(BAD)
    assert list(next(csv.reader(out.open(encoding="utf-8")))) == [
        "path", "label", "confidence", "needs_review", *[f"p_{c}" for c in clf.spec.class_names], "status", "error"]
    for name in GOOD:
        assert rows[name]["status"] == "ok" and rows[name]["label"] in clf.spec.class_names
    for name, reason in BAD.items():
        assert rows[name]["status"] == "error" and reason in rows[name]["error"], name
    assert "6 classified" in r.output and "5 errors" in r.output
    # the CLI and the API give the same numbers for the same bytes
    api = clf.predict(messy / "good.jpg")
    assert rows["good.jpg"]["label"] == api.label
    assert abs(float(rows["good.jpg"]["confidence"]) - api.confidence) < 1e-5


def test_cli_json_jsonl_stdout_and_exit_0(tmp_path, onnx_model):
    d = tmp_path / "ok"
    for i in range(3):
        write(d / f"c{i}.png", rgb(i))
    write(d / "sub" / "deep.png", rgb(9))
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "r.json").read_text())) == 3
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(tmp_path / "r.jsonl"), "-q", "-r"])
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert r.exit_code == 0 and len(lines) == 4 and any("sub/deep.png" in l for l in lines)
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", "-", "-q"])
    assert r.exit_code == 0 and "c1.png" in r.output and "label" in r.output
    assert not list(tmp_path.glob("*.partial"))


def test_cli_resume_skips_finished_images(tmp_path, onnx_model):
    d = tmp_path / "imgs"
    for i in range(5):
        write(d / f"i{i}.png", rgb(i))
    out = tmp_path / "r.csv"
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
    assert r.exit_code == 0
    lines = out.read_text().splitlines()
    # simulate an interrupted run: only 2 rows in the .partial file, the final file absent
    Path(str(out) + ".partial").write_text("\n".join(lines[:3]) + "\n")
    out.unlink()
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert "2 already done" in r.output
    assert sorted(out.read_text().splitlines()) == sorted(lines)


def test_cli_usage_model_and_device_errors_exit_2(tmp_path, onnx_model):
    (tmp_path / "d").mkdir()
    r = runner.invoke(app, [str(tmp_path / "nope"), "--model", str(onnx_model)])
    assert r.exit_code == 2 and "not a folder" in r.output
    r = runner.invoke(app, [str(tmp_path / "d"), "--model", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    r = runner.invoke(app, [str(tmp_path / "d"), "--model", str(tmp_path / "junk.onnx")])
    assert r.exit_code == 2 and "junk.onnx" in r.output


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="CUDA EP is available here")
def test_cuda_without_cuda_is_an_error_unless_fallback(tmp_path, onnx_model):
    with pytest.raises(DeviceError, match="gpu"):
        Classifier.from_file(onnx_model, device="cuda")
    c = Classifier.from_file(onnx_model, device="cuda", allow_fallback=True)
    assert c.device == "cpu" and c.providers == ["CPUExecutionProvider"]
    assert Classifier.from_file(onnx_model, device="auto").device == "cpu"
    (tmp_path / "d").mkdir()
    r = runner.invoke(app, [str(tmp_path / "d"), "--model", str(onnx_model), "--device", "cuda"])
    assert r.exit_code == 2 and "CUDA" in r.output
    r = runner.invoke(app, [str(tmp_path / "d"), "--model", str(onnx_model), "--device", "cuda", "--allow-fallback"])
    assert r.exit_code == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_matches_cpu(onnx_model):
    cpu = Classifier.from_file(onnx_model, device="cpu")
    gpu = Classifier.from_file(onnx_model, device="cuda")
    assert gpu.device == "cuda"
    a, b = cpu.predict(rgb(1)), gpu.predict(rgb(1))
    assert a.index == b.index and abs(a.confidence - b.confidence) < 1e-3


def test_runtime_never_imports_torch(onnx_model):
    code = (
        "import sys, numpy as np\n"
        "import cadbcnn_runtime\n"
        "from cadbcnn_runtime import Classifier\n"
        "import cadbcnn_runtime.cli, cadbcnn_runtime.job\n"
        f"c = Classifier.from_file({str(onnx_model)!r}, device='cpu')\n"
        "c.predict(np.zeros((50, 50, 3), np.uint8))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'cadbcnn_train', 'cadbcnn_export',\n"
        "                                                    'ray', 'pyarrow')]\n"
        "assert not bad, bad\n"
        "print('torch-free')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch-free" in r.stdout, r.stderr


# -- ModelSpec schema ------------------------------------------------------------
def test_spec_round_trip_and_validation():
    spec = ModelSpec(name="cadbcnn", version="1.0.0", class_names=("a", "b"), image_size=(32, 32))
    assert ModelSpec.from_json(spec.to_json()) == spec
    d = spec.to_dict()
    with pytest.raises(ModelSpecError, match="missing field"):
        ModelSpec.from_dict({k: v for k, v in d.items() if k != "class_names"})
    with pytest.raises(ModelSpecError, match="unknown field"):
        ModelSpec.from_dict({**d, "surprise": 1})
    for bad in ({"review_threshold": 1.5}, {"class_names": ["a"]}, {"interpolation": "lanczos"},
                {"schema_version": 99}, {"input_dtype": "int64"}, {"class_names": ["a", "a"]},
                {"std": [0, 1, 1]}, {"variant": "int4"}):
        with pytest.raises(ModelSpecError):
            ModelSpec.from_dict({**d, **bad})
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        ModelSpec.from_json("{nope")
    with pytest.raises(ModelSpecError, match=METADATA_KEY):
        ModelSpec.from_metadata({}, source="x.onnx")


def test_spec_from_onnx_matches_the_session(onnx_model, clf):
    assert ModelSpec.from_onnx(onnx_model) == clf.spec
    with pytest.raises(ModelLoadError):
        ModelSpec.from_onnx(onnx_model.parent / "missing.onnx")


RELEASED = Path(__file__).resolve().parents[1] / "models" / "cadbcnn.onnx"


@pytest.mark.skipif(not RELEASED.is_file(), reason="no released model in models/ yet")
def test_released_model_is_the_default_and_classifies_the_samples():
    from cadbcnn_runtime.variants import choose

    samples = sorted((RELEASED.parent / "samples").glob("*.jpg"))
    # path=None → the released model, in the variant this CPU runs fastest (INT8 where VNNI is there)
    _, expected, _ = choose(RELEASED, "auto", cuda=False)
    with Classifier.from_file(device="cpu") as c:
        assert c.path.resolve() == expected.resolve() and c.precision_reason
    with Classifier.from_file(device="cpu", precision="fp32") as c:
        assert c.path.resolve() == RELEASED.resolve()
        assert c.spec.metrics and c.spec.ood and c.spec.variant == "fp32-fp16weights"
        preds = c.predict_batch(samples)
    # sample files are named after their true class folder: <Class>-<file>.jpg
    truth = [p.name.split("-", 1)[0] for p in samples]
    folders = ("Benign", "Early", "Pre", "Pro")
    assert sum(folders[p.index] == t for p, t in zip(preds, truth)) >= len(samples) - 1
    r = runner.invoke(app, [str(RELEASED.parent / "samples"), "--out", "-", "-q"])
    assert r.exit_code == 0 and "label" in r.output


@pytest.mark.skipif(not RELEASED.is_file(), reason="no released model in models/ yet")
def test_released_model_never_calls_a_blank_field_silently():
    with Classifier.from_file(device="cpu") as c:
        assert c.spec.quality and c.spec.calibration
        for p in c.predict_batch([np.full((224, 224, 3), v, np.uint8) for v in range(0, 256, 20)]):
            assert p.needs_review and p.low_content


@pytest.mark.skipif(not RELEASED.is_file(), reason="no released model in models/ yet")
def test_model_card_lists_the_sha256_of_every_released_file():
    """Replacing a released file without updating models/MODEL_CARD.md fails here."""
    import hashlib
    import re

    root = RELEASED.parents[1]
    card = (root / "models" / "MODEL_CARD.md").read_text()
    listed = dict(re.findall(r"^\| `(models/[^`]+)` \|.*\| `([0-9a-f]{64})` \|$", card, flags=re.M))
    files = sorted((root / "models").glob("*.onnx")) + sorted((root / "models" / "samples").glob("*.jpg"))
    assert {str(f.relative_to(root)) for f in files} == set(listed)
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == listed[str(f.relative_to(root))], f
