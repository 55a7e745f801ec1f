"""The napari plugin: manifest validation and the widget in a real viewer (a real X server: Xvfb).

Skipped when napari is not installed (``pip install "cadbcnn[napari]"``) or when there is neither a display
nor ``Xvfb`` (Debian: ``apt-get install xvfb``). Set CADBCNN_SCREENSHOTS=DIR to keep the screenshot.
"""

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

napari = pytest.importorskip("napari")
npe2 = pytest.importorskip("npe2")

MANIFEST = Path(__file__).resolve().parents[1] / "cadbcnn_runtime" / "napari_plugin" / "napari.yaml"


@pytest.fixture(scope="session", autouse=True)
def x_display():
    """A real X display for Qt + OpenGL: the user's, or a private Xvfb."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if not shutil.which("Xvfb"):
        pytest.skip("no display and no Xvfb (apt-get install xvfb)")
    display = f":{90 + os.getpid() % 500}"

    def die_with_pytest():  # the X server must outlive Qt's last use of it: end it when this process ends
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    subprocess.Popen(["Xvfb", display, "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_pytest)
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{display[1:]}").exists():
            break
        time.sleep(0.05)
    os.environ["DISPLAY"] = display
    os.environ.pop("QT_QPA_PLATFORM", None)
    yield display


def test_manifest_is_valid_and_registered():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(MANIFEST)
    assert pm.name == "cadbcnn" and {c.id for c in pm.contributions.commands} >= {"cadbcnn.make_widget",
                                                                                  "cadbcnn.classify_folder"}
    r = subprocess.run([str(Path(os.sys.executable).parent / "npe2"), "validate", str(MANIFEST)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr
    installed = PluginManifest.from_distribution("cadbcnn")  # the entry point of the installed package
    assert installed.name == "cadbcnn"


def _rgb(seed, h=80, w=90):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_widget_classifies_a_layer_off_the_gui_thread(make_napari_viewer, qtbot, onnx_model, tmp_path):
    from cadbcnn_runtime import Classifier
    from cadbcnn_runtime.napari_plugin.widget import CadbcnnWidget

    viewer = make_napari_viewer()
    image = _rgb(1)
    viewer.add_image(image, rgb=True, name="smear-1")
    widget = CadbcnnWidget(viewer, model=str(onnx_model))
    viewer.window.add_dock_widget(widget, name="cadbcnn")
    threads = []
    real = widget._classifier

    def spy():
        threads.append(threading.get_ident())
        return real()

    widget._classifier = spy
    widget.classify_button.click()
    assert not widget.classify_button.isEnabled()  # busy while the worker runs; the click returned at once
    qtbot.waitUntil(lambda: widget.last_prediction is not None and widget.classify_button.isEnabled(),
                    timeout=60_000)
    assert threads and threads[0] != threading.get_ident()  # the model ran off the GUI thread
    expected = Classifier.from_file(onnx_model, device="cpu").predict(image)
    p = widget.last_prediction
    assert p.label == expected.label and abs(p.confidence - expected.confidence) < 1e-6
    text = widget.result.text()
    assert p.label in text and "needs review" in text and "out of distribution" in text
    shots = Path(os.environ.get("CADBCNN_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = viewer.screenshot(path=str(shots / "napari-widget.png"), canvas_only=False)
    assert shot.shape[0] > 300 and shot.std() > 5  # a real render, not a blank frame


def test_widget_refuses_a_non_image_layer(make_napari_viewer, onnx_model):
    from cadbcnn_runtime.napari_plugin.widget import CadbcnnWidget

    viewer = make_napari_viewer()
    viewer.add_points(np.array([[10, 10]]))
    widget = CadbcnnWidget(viewer, model=str(onnx_model))
    widget.classify_selected()
    assert "select an image layer" in widget.status.text() and widget.worker is None


def test_folder_command_writes_what_cadbcnn_infer_writes(make_napari_viewer, qtbot, onnx_model, tmp_path):
    from cadbcnn_runtime.job import classify_to_file
    from cadbcnn_runtime.napari_plugin.widget import CadbcnnWidget

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"c{i}.png"), _rgb(i))
    (folder / "broken.jpg").write_bytes(b"not an image")
    viewer = make_napari_viewer()
    widget = CadbcnnWidget(viewer, model=str(onnx_model))
    widget.classify_folder(str(folder), str(tmp_path / "plugin.csv"))
    qtbot.waitUntil(lambda: widget.last_result is not None, timeout=60_000)
    classify_to_file(folder, tmp_path / "cli.csv", model=onnx_model, say=lambda _: None)
    assert (tmp_path / "plugin.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()
    assert widget.last_result.summary.errors == 1 and "1 errors" in widget.result.text()
