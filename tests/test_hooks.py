"""The acquisition hook (pycro-manager ``image_process_fn``) — torch-free, no microscope, no pycro-manager."""

import json
import threading
import time

import numpy as np
import pytest

from cadbcnn_runtime.classifier import Prediction
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.hooks import FIELDS, FrameProcessor, pycromanager_processor

pytestmark = pytest.mark.runtime


class SlowFake:
    """Stands in for a Classifier: a fixed answer after ``delay`` seconds per batch."""

    def __init__(self, delay=0.2):
        self.delay, self.batches = delay, []
        self.release = threading.Event()
        self.release.set()

    def preprocess(self, frame, name=None):
        if frame.ndim not in (2, 3):
            raise ValueError(f"{name}: not an image")
        return np.zeros((3, 8, 8), np.uint8)

    def classify(self, batch):
        self.release.wait()
        time.sleep(self.delay)
        self.batches.append(len(batch))
        return [Prediction("Pro-B", 3, 0.9, {"Benign": 0.1, "Pro-B": 0.9}, False, 0.2, False)] * len(batch)


def frame(i=0):
    return np.full((32, 32), i, np.uint16)  # a 16-bit grey camera frame


def test_background_mode_never_blocks_and_fills_metadata():
    fake = SlowFake(delay=0.05)
    fake.release.clear()  # inference cannot finish until released: a blocking hook would hang the caller
    with FrameProcessor(fake, queue_size=8) as hook:
        metas, returned = [], []

        def acquire():
            for i in range(5):
                img = frame(i)
                out_img, meta = hook(img, {"Axes": {"time": i}})
                returned.append(out_img is img)  # the same array, unchanged
                metas.append(meta)

        caller = threading.Thread(target=acquire)
        caller.start()
        caller.join(timeout=10)
        assert not caller.is_alive() and returned == [True] * 5  # all five frames returned while inference hangs
        assert [m["cadbcnn_status"] for m in metas] == ["queued"] * 5
        fake.release.set()
        assert hook.drain(timeout=10)
    for m in metas:
        assert m["cadbcnn_status"] == "classified" and all(k in m for k in FIELDS)
        assert (m["cadbcnn_label"], m["cadbcnn_needs_review"], m["cadbcnn_ood"]) == ("Pro-B", False, False)
    assert hook.stats.classified == 5 and hook.stats.dropped == 0
    assert max(fake.batches) > 1  # queued frames are classified in batches


def test_full_queue_drops_with_a_counter_never_silently():
    fake = SlowFake(delay=0.0)
    fake.release.clear()  # the worker is stuck in its first batch
    hook = FrameProcessor(fake, queue_size=2, batch=1)
    metas = [hook(frame(i), {"ImageNumber": i})[1] for i in range(10)]
    statuses = [m["cadbcnn_status"] for m in metas]
    dropped = [m for m in metas if m["cadbcnn_status"] == "dropped"]
    assert hook.stats.dropped == len(dropped) >= 6 and statuses.count("queued") <= 3
    assert [m["cadbcnn_dropped_total"] for m in dropped] == list(range(1, len(dropped) + 1))
    fake.release.set()
    stats = hook.close(timeout=10)
    assert stats.received == 10 and stats.classified + stats.dropped == 10


def test_bad_frame_is_an_error_status_and_results_file(tmp_path):
    results = tmp_path / "frames.jsonl"
    hook = FrameProcessor(SlowFake(delay=0), mode="inline", results_path=results)
    _, good = hook(frame(1), {"Axes": {"z": 0}})
    bad_img = np.zeros((2, 2, 2, 2), np.uint8)
    out, bad = hook(bad_img, {"Axes": {"z": 1}})
    assert out is bad_img
    assert good["cadbcnn_status"] == "classified" and good["cadbcnn_label"] == "Pro-B"  # inline: set before return
    assert bad["cadbcnn_status"].startswith("error:") and "cadbcnn_label" not in bad
    hook.close()
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["Axes"]["z"] for x in lines] == [0, 1]
    assert lines[0]["cadbcnn_probabilities"]["Pro-B"] == 0.9 and lines[1]["cadbcnn_status"].startswith("error")
    assert hook.stats.errors == 1


def test_arguments_are_checked(onnx_model, tmp_path):
    with pytest.raises(ArgumentError, match="mode"):
        FrameProcessor(SlowFake(), mode="fast")
    with pytest.raises(ArgumentError, match="queue_size"):
        FrameProcessor(SlowFake(), queue_size=0)
    with pytest.raises(ArgumentError, match="does not exist"):
        pycromanager_processor(onnx_model, results_path=tmp_path / "no" / "r.jsonl")


def test_real_model_on_grey_rgb_and_rgba_frames(onnx_model):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 65535, (96, 128), dtype=np.uint16), rng.integers(0, 256, (96, 128, 3), np.uint8),
              rng.integers(0, 256, (96, 128, 4), np.uint8)]
    hook = pycromanager_processor(onnx_model, queue_size=4)
    metas = [hook(f, {"ImageNumber": i})[1] for i, f in enumerate(frames)]
    hook.close()
    for m in metas:
        assert m["cadbcnn_status"] == "classified", m
        assert 0.0 <= m["cadbcnn_confidence"] <= 1.0 and isinstance(m["cadbcnn_needs_review"], bool)
    direct = hook.clf.predict(frames[1])
    assert metas[1]["cadbcnn_label"] == direct.label and abs(metas[1]["cadbcnn_confidence"] - direct.confidence) < 1e-6
