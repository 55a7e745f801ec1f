"""`cadbcnn-infer --engine ray`, list files, URIs and Parquet output — torch-free (marker `runtime`).

The Ray tests run on one local Ray instance (``ray.init(num_cpus=2)``) shared by the module; they are skipped
where Ray is not installed (the runtime-only environment), where the missing-extra error is tested instead.
"""

import csv
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime.cli import app
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.folder import Summary, columns
from cadbcnn_runtime.job import classify_to_file

pytestmark = pytest.mark.runtime
runner = CliRunner()


def _png(img: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 and img.shape[2] == 3 else img
    return cv2.imencode(".png", bgr)[1].tobytes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Good images of every kind plus the bad-file corpus: zero-byte, truncated, not-an-image, huge."""
    d = tmp_path_factory.mktemp("corpus") / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(18):
        (d / f"cell-{i:02d}.png").write_bytes(_png(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)))
    (d / "grey.png").write_bytes(_png(np.full((48, 48), 200, np.uint8)))
    rgba = rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)
    (d / "rgba.png").write_bytes(cv2.imencode(".png", rgba)[1].tobytes())
    (d / "sixteen.tif").write_bytes(cv2.imencode(".tif", rng.integers(0, 65535, (48, 48, 3), dtype=np.uint16))[1]
                                    .tobytes())
    (d / "zero.jpg").write_bytes(b"")
    full = cv2.imencode(".jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is not an image")
    from test_runtime import huge_png_header

    (d / "huge.png").write_bytes(huge_png_header())
    return d


BAD = {"zero.jpg", "truncated.jpg", "text.jpg", "huge.png"}


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


# -- without Ray ----------------------------------------------------------------------------------------------
def test_engine_ray_without_ray_names_the_extra(corpus, onnx_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed (it is not, in the runtime env)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "r.csv"
    with pytest.raises(ArgumentError, match=r"cadbcnn\[distributed\]"):
        classify_to_file(corpus, out, model=onnx_model, engine="ray")
    r = runner.invoke(app, [str(corpus), "--model", str(onnx_model), "--engine", "ray", "--out", str(out)])
    assert r.exit_code == 2 and "cadbcnn[distributed]" in r.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()  # refused before any work


def test_engine_options_are_checked_up_front(corpus, onnx_model, tmp_path):
    with pytest.raises(ArgumentError, match="options of --engine ray"):
        classify_to_file(corpus, tmp_path / "r.csv", model=onnx_model, actors=2)
    r = runner.invoke(app, [str(corpus), "--model", str(onnx_model), "--engine", "spark"])
    assert r.exit_code == 2


# -- list files and URIs (local engine) ---------------------------------------------------------------------
def test_list_file_and_file_uri_give_the_folder_rows(corpus, onnx_model, tmp_path):
    ref = classify_to_file(corpus, tmp_path / "folder.csv", model=onnx_model)
    assert ref.exit_code == 1 and ref.summary.errors == len(BAD)
    by_name = {r["path"]: r for r in _rows(tmp_path / "folder.csv")}
    lst = tmp_path / "images.txt"
    names = sorted(by_name)
    lst.write_text("# our images\n\n" + "\n".join(str(corpus / n) for n in names) + "\n" + str(corpus / names[0])
                   + "\n" + str(corpus / "missing.jpg") + "\n" + str(corpus / "notes.txt") + "\n")
    got = classify_to_file(lst, tmp_path / "list.csv", model=onnx_model)
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "list.csv")}
    assert len(rows) == len(names) + 2  # the repeated line once; a missing file and a non-image name as errors
    assert "file not found" in rows["missing.jpg"]["error"] and "not an image file name" in rows["notes.txt"]["error"]
    for n in names:
        a, b = by_name[n], rows[n]
        assert (a["label"], a["p_Benign"], a["status"]) == (b["label"], b["p_Benign"], b["status"])
    assert got.summary.errors == len(BAD) + 2
    pytest.importorskip("pyarrow")
    uri = classify_to_file(corpus.resolve().as_uri(), tmp_path / "uri.csv", model=onnx_model)
    assert uri.total == len(names)
    for r in _rows(tmp_path / "uri.csv"):
        a = by_name[r["path"]]
        assert (a["label"], a["p_Pro-B"], a["status"]) == (r["label"], r["p_Pro-B"], r["status"])
        if r["status"] == "error":  # the same reason, named by its URI
            assert r["error"].split(": ", 1)[1] == a["error"].split(": ", 1)[1]


def test_parquet_output_is_typed_and_resumable(corpus, onnx_model, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    first = classify_to_file(corpus, out, model=onnx_model)
    t = pq.read_table(out)
    from cadbcnn_runtime.classifier import Classifier

    spec = Classifier.from_file(onnx_model, device="cpu").spec
    assert t.schema.names == columns(spec.class_names, ood=spec.ood is not None, quality=spec.quality is not None)
    assert t.schema.field("confidence").type == pa.float64() and t.schema.field("needs_review").type == pa.bool_()
    rows = t.to_pylist()
    assert len(rows) == first.total and not out.with_name("r.parquet.partial").exists()
    bad = [r for r in rows if r["status"] == "error"]
    assert {r["path"] for r in bad} == BAD and all(r["confidence"] is None for r in bad)
    again = classify_to_file(corpus, out, model=onnx_model, resume=True)
    assert again.summary.skipped_resume == first.summary.ok and again.summary.ok == 0
    assert again.summary.errors == len(BAD)  # errored files are retried
    assert sorted(r["path"] for r in pq.read_table(out).to_pylist()) == sorted(r["path"] for r in rows)


# -- Ray -------------------------------------------------------------------------------------------------------
def test_ray_engine_writes_what_the_local_engine_writes(ray_local, corpus, onnx_model, tmp_path):
    local = classify_to_file(corpus, tmp_path / "local.csv", model=onnx_model, batch=4)
    ray = classify_to_file(corpus, tmp_path / "ray.csv", model=onnx_model, engine="ray", batch=4, actors=2)
    assert "2 actor(s) × 1 thread(s)" in ray.engine_info
    assert (ray.exit_code, ray.summary.ok, ray.summary.errors) == (local.exit_code, local.summary.ok,
                                                                   local.summary.errors)
    a, b = _rows(tmp_path / "local.csv"), _rows(tmp_path / "ray.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]  # SOURCE order kept
    assert {r["path"] for r in b if r["status"] == "error"} == BAD
    for x, y in zip(a, b):
        assert (x["label"], x["status"], x["error"], x["needs_review"]) == (y["label"], y["status"], y["error"],
                                                                            y["needs_review"])
        for k in x:
            if k.startswith("p_") and x[k]:
                assert abs(float(x[k]) - float(y[k])) <= 1e-5
    pytest.importorskip("pyarrow")
    classify_to_file(corpus, tmp_path / "ray.parquet", model=onnx_model, engine="ray", batch=4)
    p = _rows(tmp_path / "ray.parquet")
    assert [r["path"] for r in p] == [r["path"] for r in a]
    assert list(p[0]) == list(a[0])  # the same column set, in the same order


def test_ray_engine_resumes_without_counting_twice(ray_local, corpus, onnx_model, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    calls = {"n": 0}
    real_add = Summary.add

    def killed_after_one_batch(self, row):
        calls["n"] += 1
        if calls["n"] > 8:  # the driver is killed while the second batch of rows comes in
            raise KeyboardInterrupt
        real_add(self, row)

    monkeypatch.setattr(Summary, "add", killed_after_one_batch)
    first = classify_to_file(corpus, out, model=onnx_model, engine="ray", batch=2, actors=1)
    monkeypatch.setattr(Summary, "add", real_add)
    assert first.exit_code == 130 and first.output.name == "r.jsonl.partial"
    kept = [json.loads(line) for line in first.output.read_text().splitlines()]
    assert 0 < len(kept) < first.total
    second = classify_to_file(corpus, out, model=onnx_model, engine="ray", batch=2, resume=True)
    kept_ok = sum(r["status"] == "ok" for r in kept)
    assert second.summary.skipped_resume == kept_ok
    assert second.summary.ok + second.summary.errors == first.total - kept_ok
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in final) == sorted({r["path"] for r in final})  # nothing twice
    assert len(final) == first.total


def test_ray_cli_with_a_list_file(ray_local, corpus, onnx_model, tmp_path):
    lst = tmp_path / "some.lst"
    lst.write_text("\n".join(str(corpus / n) for n in ("cell-00.png", "cell-01.png", "zero.jpg")) + "\n")
    out = tmp_path / "r.csv"
    r = runner.invoke(app, [str(lst), "--model", str(onnx_model), "--engine", "ray", "--actors", "1", "--out",
                            str(out), "-q"])
    assert r.exit_code == 1, r.output  # one unreadable file
    assert "engine ray: 1 actor(s)" in r.output and "3 images: 2 classified" in r.output
    assert [x["status"] for x in _rows(out)] == ["ok", "ok", "error"]


def test_ray_engine_refuses_more_cpus_than_the_cluster_has(ray_local, corpus, onnx_model, tmp_path):
    with pytest.raises(ArgumentError, match="needs 6 CPUs"):
        classify_to_file(corpus, tmp_path / "r.csv", model=onnx_model, engine="ray", actors=3, threads=2)
