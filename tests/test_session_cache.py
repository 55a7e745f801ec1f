"""The optimised-graph session cache (#13, cold start): same outputs, keyed by verified content and machine,
never trusting a changed entry, and never in the way (off by switch, unwritable folder, CUDA)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cadbcnn_runtime import Classifier
from cadbcnn_runtime import session_cache as sc
from cadbcnn_runtime.machine import CpuInfo

pytestmark = pytest.mark.runtime


def _outputs(clf):
    rng = np.random.default_rng(0)
    h, w = clf.spec.image_size
    images = rng.integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
    pre = [clf.preprocess(im) for im in images]
    batch = np.concatenate([x[None] if x.ndim == 3 else x for x in pre])
    logits, ood = clf.run_all(batch)
    return logits, ood


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(sc.ENV_DIR, str(d))
    monkeypatch.delenv(sc.ENV_SWITCH, raising=False)
    return d


def test_miss_then_hit_gives_identical_outputs(onnx_model, cache, monkeypatch):
    first = Classifier.from_file(onnx_model, device="cpu")
    assert first.session_cache == "miss"
    entries = sorted(p.suffix for p in cache.iterdir())
    assert entries == [".json", ".onnx"], "one graph and its record, no temporary files left"
    second = Classifier.from_file(onnx_model, device="cpu")
    assert second.session_cache == "hit"
    monkeypatch.setenv(sc.ENV_SWITCH, "0")
    plain = Classifier.from_file(onnx_model, device="cpu")
    assert plain.session_cache.startswith("off")
    ref_logits, ref_ood = _outputs(plain)
    for clf in (first, second):
        logits, ood = _outputs(clf)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
        if ref_ood is not None:
            np.testing.assert_allclose(ood, ref_ood, rtol=1e-6, atol=1e-6)


def test_a_changed_or_damaged_entry_is_rebuilt_not_trusted(onnx_model, cache):
    ref = _outputs(Classifier.from_file(onnx_model, device="cpu"))[0]
    graph = next(cache.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:1000])  # truncated: size no longer matches the record
    clf = Classifier.from_file(onnx_model, device="cpu")
    assert clf.session_cache == "miss"
    np.testing.assert_allclose(_outputs(clf)[0], ref, rtol=1e-6, atol=1e-6)
    # damaged with a record that matches it (e.g. written by a crashed process): unloadable → rebuilt
    graph.write_bytes(b"not an onnx graph")
    record = next(cache.glob("*.json"))
    meta = json.loads(record.read_text())
    meta["stamp"] = sc._stamp(graph)
    record.write_text(json.dumps(meta))
    clf = Classifier.from_file(onnx_model, device="cpu")
    assert clf.session_cache == "miss"
    np.testing.assert_allclose(_outputs(clf)[0], ref, rtol=1e-6, atol=1e-6)
    assert Classifier.from_file(onnx_model, device="cpu").session_cache == "hit"


def test_unusable_folder_turns_the_cache_off_not_the_model(onnx_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(sc.ENV_DIR, str(blocker / "cache"))  # a folder under a file cannot be made
    clf = Classifier.from_file(onnx_model, device="cpu")
    assert clf.session_cache.startswith("off (cannot use")
    assert _outputs(clf)[0].shape[0] == 3


def test_key_follows_content_runtime_and_cpu(monkeypatch):
    import cadbcnn_runtime.machine as machine

    monkeypatch.setattr(machine, "cpu_info", lambda: CpuInfo("cpu A", frozenset({"avx2"})))
    a = sc.cache_key("0" * 64)
    assert a == sc.cache_key("0" * 64)
    assert sc.cache_key("1" * 64) != a
    monkeypatch.setattr(machine, "cpu_info", lambda: CpuInfo("cpu A", frozenset({"avx2", "avx512f"})))
    assert sc.cache_key("0" * 64) != a, "a graph optimised for another instruction set is never reused"


def test_cache_folder_defaults_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv(sc.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(sc.ENV_SWITCH, raising=False)
    assert sc.cache_dir() == tmp_path / "cadbcnn" / "ort"
    for off in ("0", "off", "False"):
        monkeypatch.setenv(sc.ENV_SWITCH, off)
        assert sc.cache_dir() is None


def test_only_the_newest_entries_are_kept(onnx_model, cache, monkeypatch):
    monkeypatch.setattr(sc, "MAX_ENTRIES", 2)
    cache.mkdir(parents=True)
    for i in range(3):  # three older entries of other models
        (cache / f"old{i}.onnx").write_bytes(b"x")
        (cache / f"old{i}.json").write_text("{}")
        os.utime(cache / f"old{i}.json", ns=(10**18 + i, 10**18 + i))
    assert Classifier.from_file(onnx_model, device="cpu").session_cache == "miss"
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 4 and "old2.json" in names and "old0.json" not in names and "old1.onnx" not in names
