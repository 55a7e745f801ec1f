"""The cadbcnn dock widget for napari.

* **Model** — the released model by default, or any cadbcnn ONNX file (*Model…*); loaded and checked
  (spec, integrity) off the GUI thread, like everything slow here.
* **Classify layer** — the selected image layer (RGB, RGBA or grey; for a stack, the slice on screen) →
  label, calibrated class probabilities, ``needs_review`` with its reason, the OOD flag and score.
* **Classify folder…** — every image of a folder into a results file, exactly as ``cadbcnn-infer FOLDER
  --out FILE`` does (``cadbcnn_runtime.job.classify_to_file``); the summary is shown when it is done.

Work runs in napari's thread workers (``napari.qt.threading.thread_worker``), so the viewer stays responsive.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from qtpy.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget)

from ..reasons import review_reasons

if TYPE_CHECKING:
    import napari

    from ..classifier import Classifier, Prediction


def layer_image(layer, viewer=None) -> np.ndarray:
    """The 2-D image (grey, RGB or RGBA) a layer shows now; ValueError naming the fix otherwise."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise ValueError("select an image layer (RGB or grey) to classify")
    data = np.asarray(layer.data if not layer.multiscale else layer.data[0])
    rgb = bool(layer.rgb)
    spatial = data.ndim - (1 if rgb else 0)
    if spatial > 2:  # a stack: take the slice on screen
        step = tuple(viewer.dims.current_step[-data.ndim + (1 if rgb else 0):]) if viewer is not None else ()
        index = tuple(step[: spatial - 2]) if len(step) >= spatial - 2 else (0,) * (spatial - 2)
        data = data[index]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (3, 4)):
        raise ValueError(f"layer {layer.name!r} has shape {data.shape}; expected a 2-D grey or RGB(A) image")
    return data


def reason(p: "Prediction", review_threshold: float | Mapping[str, float]) -> str:
    """Why a prediction needs review, in words ('' when it does not). ``review_threshold``: one threshold, or the
    classifier's threshold per predicted class (``Classifier.review_thresholds``)."""
    if isinstance(review_threshold, Mapping):
        review_threshold = review_threshold[p.label]
    if not p.needs_review:
        return ""
    parts = review_reasons(p.label, blank=p.low_content, ood=p.out_of_distribution, ood_score=p.ood_score,
                           atypical=p.atypical_appearance, appearance_score=p.appearance_score,
                           low_score=p.low_review_score, review_score=p.review_score)
    if p.confidence < review_threshold:
        parts.append(f"confidence {p.confidence:.3f} below the review threshold {review_threshold:.3f} of {p.label}")
    return "; ".join(parts)


def format_prediction(p: "Prediction", review_threshold: float | Mapping[str, float], name: str = "") -> str:
    """Rich text for the result panel."""
    colour = "#d9534f" if p.needs_review else "#3c9d5d"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td align='right'>{v:.3f}</td></tr>"
                   for k, v in sorted(p.probabilities.items(), key=lambda kv: -kv[1]))
    why = reason(p, review_threshold)
    ood = "—" if p.ood_score is None else f"{'yes' if p.out_of_distribution else 'no'} (score {p.ood_score:.3f})"
    return (f"<b>{html.escape(name)}</b><br><span style='font-size:15pt'><b>{html.escape(p.label)}</b></span> "
            f"{p.confidence:.3f}<br><span style='color:{colour}'><b>needs review: "
            f"{'yes' if p.needs_review else 'no'}</b>{(' — ' + html.escape(why)) if why else ''}</span><br>"
            f"out of distribution: {ood}<table>{rows}</table>")


def classify_folder(folder: str, out: str, model: str | None = None, recursive: bool = False):
    """The npe2 command: classify FOLDER into OUT like ``cadbcnn-infer`` (returns its ``JobResult``)."""
    from ..job import classify_to_file

    return classify_to_file(folder, out, model=model, recursive=recursive, say=lambda _: None)


class CadbcnnWidget(QWidget):
    """Dock widget: choose a model, classify the selected layer or a folder, see the result."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", model: str | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.model_path: str | None = str(model) if model else None
        self.clf: "Classifier | None" = None
        self.worker = None            # the last thread worker started (tests wait on it)
        self.last_prediction = None
        self.last_result = None       # the last folder JobResult

        self.model_edit = QLineEdit(self.model_path or "")
        self.model_edit.setPlaceholderText("released model (models/cadbcnn.onnx)")
        browse = QPushButton("Model…")
        browse.clicked.connect(self._choose_model)
        row = QHBoxLayout()
        row.addWidget(self.model_edit)
        row.addWidget(browse)
        self.classify_button = QPushButton("Classify layer")
        self.classify_button.clicked.connect(self.classify_selected)
        self.folder_button = QPushButton("Classify folder…")
        self.folder_button.clicked.connect(self._choose_folder)
        self.status = QLabel("Select an image layer and press Classify layer.")
        self.status.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        layout = QVBoxLayout()
        layout.addLayout(row)
        layout.addWidget(self.classify_button)
        layout.addWidget(self.folder_button)
        layout.addWidget(self.status)
        layout.addWidget(self.result)
        layout.addStretch(1)
        self.setLayout(layout)

    # -- model -------------------------------------------------------------------------------------------
    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "cadbcnn ONNX model", "", "ONNX models (*.onnx)")
        if path:
            self.model_edit.setText(path)

    def _classifier(self) -> "Classifier":
        """Load (or reuse) the model named in the box — called in the worker thread."""
        from ..classifier import Classifier

        wanted = self.model_edit.text().strip() or None
        if self.clf is None or wanted != self.model_path:
            self.clf = Classifier.from_file(wanted, device="cpu")
            self.model_path = wanted
        return self.clf

    # -- classify the selected layer -----------------------------------------------------------------------
    def classify_selected(self) -> None:
        layer = self.viewer.layers.selection.active
        try:
            image = layer_image(layer, self.viewer)
        except ValueError as exc:
            self._show_error(str(exc))
            return
        from napari.qt.threading import thread_worker

        name = layer.name

        @thread_worker
        def work():
            clf = self._classifier()
            return clf.predict(image), clf.review_thresholds

        self._start(work(), f"classifying {name}…", lambda res: self._show_prediction(name, *res))

    def _show_prediction(self, name: str, p: "Prediction", review_threshold: float) -> None:
        self.last_prediction = p
        self.result.setText(format_prediction(p, review_threshold, name))
        self.status.setText(f"model: {self.clf.path.name} ({self.clf.spec.name} {self.clf.spec.version})")

    # -- classify a folder -------------------------------------------------------------------------------
    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images")
        if not folder:
            return
        out, _ = QFileDialog.getSaveFileName(self, "Results file", str(Path(folder).parent /
                                             f"{Path(folder).name}_predictions.csv"),
                                             "Results (*.csv *.jsonl *.json *.parquet)")
        if out:
            self.classify_folder(folder, out)

    def classify_folder(self, folder: str, out: str) -> None:
        from napari.qt.threading import thread_worker

        model = self.model_edit.text().strip() or None

        @thread_worker
        def work():
            return classify_folder(folder, out, model=model)

        self._start(work(), f"classifying {folder}…", self._show_folder_result)

    def _show_folder_result(self, res) -> None:
        self.last_result = res
        s = res.summary
        per_class = ", ".join(f"{n} {s.per_class.get(n, 0)}" for n in res.class_names)
        self.result.setText(f"<b>{res.total} images</b>: {s.ok} classified ({html.escape(per_class)}); "
                            f"<b>{s.needs_review} need review</b> ({s.out_of_distribution} out of distribution); "
                            f"{s.errors} errors → {html.escape(str(res.output))}")
        self.status.setText("folder done" + (" (some files could not be read: see status=error rows)"
                                             if s.errors else ""))

    # -- plumbing ------------------------------------------------------------------------------------------
    def _start(self, worker, message: str, on_done) -> None:
        self.classify_button.setEnabled(False)
        self.folder_button.setEnabled(False)
        self.status.setText(message)
        worker.returned.connect(on_done)
        worker.errored.connect(lambda exc: self._show_error(str(exc)))
        worker.finished.connect(self._idle)
        self.worker = worker
        worker.start()

    def _idle(self) -> None:
        self.classify_button.setEnabled(True)
        self.folder_button.setEnabled(True)

    def _show_error(self, message: str) -> None:
        self.status.setText(f"<span style='color:#d9534f'>error: {html.escape(message)}</span>")
