"""Package a cadbcnn ONNX model for the BioImage Model Zoo (bioimage.io model description format 0.5).

    from cadbcnn_export.bioimageio import build_package, test_package
    summary = build_package(Path("models/cadbcnn.onnx"), Path("/tmp/cadbcnn-bioimageio.zip"))
    passed, text = test_package(Path("/tmp/cadbcnn-bioimageio.zip"))

The rdf is built with ``bioimageio.spec.model.v0_5`` classes (never hand-written YAML), written with
``save_bioimageio_package`` and tested with bioimageio.core's ``test_model`` (the code behind ``bioimageio
test``). Needs the ``bioimageio`` extra (``pip install 'cadbcnn[bioimageio]'``: bioimageio.core and onnx);
torch-free. bioimageio.core 0.11.0 pins bioimageio.spec 0.5.12.0, whose file serializer breaks under pydantic
2.14 (``'index_key' is expected to be an integer or a string``), hence ``pydantic<2.14`` in the extra.

Design decisions
================

Outputs. bioimage.io consumers expect class probabilities on a channel axis named by class, but a cadbcnn graph
ends in logits. The package therefore carries its own ONNX file, derived with ``onnx.helper`` from the source
model: ``probabilities = Softmax(logits / T)`` (T = the spec's calibration temperature, 1 when the model is
uncalibrated) is appended and becomes the first graph output, so its values are exactly the runtime's
calibrated ``Prediction.probabilities``. ``logits`` stays inside the graph but is no longer an output (bioimage.io
maps graph outputs to described tensors by position, and a consumer has no use for both). A model whose spec has
an ``ood`` entry keeps ``ood_score`` as the second graph output: the 0.5 format allows several outputs and a
tensor whose only axis is the batch axis, so it is described as axes ``[batch]``, float32, range ``[0, inf)``,
with the threshold in its description. Graph nodes, weights and every ``metadata_props`` entry of the source
(its ``cadbcnn.spec`` included) are kept; a ``cadbcnn.bioimageio`` entry is added that names the source file's
sha256 and says how the file was derived. The source's ``content_sha256`` stamp covers its own graph, so
``cadbcnn_runtime`` refuses the derived file (integrity check) — use the source model with ``cadbcnn-infer``;
the package is for bioimage.io consumers. The derived file's sha256 is in the rdf (``weights.onnx.sha256``),
and before anything is written the package's outputs are checked against ``cadbcnn_runtime`` on the test
images: calibrated probabilities and OOD scores must agree within 1e-5, or nothing is written.

Input. ``image``: uint8, axes batch / channel (r, g, b) / y / x, y and x fixed at the spec's ``image_size``.
Decoding, RGB conversion and the resize (OpenCV, INTER_AREA) happen before the model, as in the runtime;
normalisation is inside the graph, so no bioimage.io pre-processing is declared.

Test tensors. Up to ``max_test_images`` images from ``samples`` (sorted by name; the released model's eight
test-split samples by default), preprocessed with ``Classifier.preprocess`` and stacked into one
``test_input_image.npy``; the expected outputs are onnxruntime's (CPU) on the package's own ONNX file. A
sample TIFF of the first image (and of its outputs) is added for human readers.

Tolerance (``config.bioimageio.reproducibility_tolerance``). Probabilities: absolute 1e-3 and relative 1e-3, no
mismatched element allowed. On the CPU that computed them the test outputs are reproduced exactly, and the
package agrees with the runtime to about 1e-7; the 1e-3 margin is for other CPUs and execution providers (not
measured here: no GPU; TF32 convolutions could need more), while a real change (other weights, a lost
calibration, swapped classes) moves probabilities by far more. OOD score: relative 1e-3 and absolute
min(1e-3, 1 % of the largest test value) — the spec caps the absolute tolerance at 1 % of the largest test
value.

Zip. Members are stored, not deflated (``compress=True`` deflates): float weights shrink by a few per cent only,
while every reader pays the decompression (``bioimageio test`` reads the weights several times).

Covers. One 2:1 PNG (1024 x 512, shrunk if over the 500 KB the spec asks for; 2:1 or 1:1 are the accepted
aspect ratios): the first test image, enlarged, with the predicted label and calibrated confidence drawn on it
(``cv2.putText``) and a panel of the four class probabilities and the review flags.

Documentation. ``README.md`` generated from the spec (classes, input, calibration, thresholds, metrics,
training facts) and the model card's facts (intended use, data, limitations, bias and risks, how the review
flags work, citations), with the ``# Validation`` section the spec asks for. ``models/MODEL_CARD.md`` is
attached when it sits beside the model and names the model file's sha256, and the samples' ``README.md``
(image attribution) when present.

Metadata. Name, description, version (the spec's), licence Apache-2.0, tags (bioimage.io categories
``image-classification``, ``2d``, ``cells``, ``transmission-light-microscopy``, ``pytorch``, ``resnet`` plus
free tags), citations (the paper, after Jha et al., and the dataset by its DOI), and ``config.cadbcnn`` with
what a consumer needs to reproduce ``needs_review`` (temperature, review and OOD thresholds, the field-content
check). No ``id`` (bioimage.io assigns it on upload). The repository holds no DOI or URL for the Jha et al.
paper, so unless ``paper_doi``/``paper_url`` is given it is cited by its text with a literature-search URL,
which the format requires in the absence of a DOI — no identifier is made up.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from zipfile import ZIP_DEFLATED, ZIP_STORED
from typing import Any, Sequence

import numpy as np

from cadbcnn_runtime._onnxmeta import file_sha256
from cadbcnn_runtime.calibration import describe_thresholds, review_thresholds, temperature_of
from cadbcnn_runtime.decode import IMAGE_SUFFIXES
from cadbcnn_runtime.errors import ArgumentError, ExportError, ModelLoadError
from cadbcnn_runtime.reliability import softmax
from cadbcnn_runtime.session import make_session
from cadbcnn_runtime.spec import DATASET_CITATION, ModelSpec

EXTRA_HINT = "pip install 'cadbcnn[bioimageio]'"
PROBABILITIES = "probabilities"
PACKAGE_METADATA_KEY = "cadbcnn.bioimageio"
#: The package's outputs must equal the runtime's (calibrated probabilities, OOD score) within this.
PARITY_TOLERANCE = 1e-5
WARNING_SEVERITY = 30               # bioimageio.spec's WARNING level; INFO (20) entries are only counted
PROB_ATOL = 1e-3
PROB_RTOL = 1e-3
OOD_RTOL = 1e-3
COVER_SIZE = (1024, 512)            # width, height: 2:1
COVER_MAX_BYTES = 500_000
DATASET_DOI = "10.34740/KAGGLE/DSV/2175623"
PAPER_TEXT = ("Jha et al., Cross-Attentive Dual-Branch CNN (CADBCNN) for the classification of leukemia blood "
              "cells: ResNet18 and ResNet34 branches fused by cross-attention (the architecture this model follows).")
#: Used only when no DOI or URL of the paper is given: the format needs one of the two, and none is on record here.
PAPER_SEARCH_URL = ("https://scholar.google.com/scholar?q=%22Cross-Attentive+Dual-Branch+CNN%22+leukemia+"
                    "blood+cell+classification")
TAGS = ("image-classification", "classification", "2d", "cells", "white-blood-cells", "leukemia",
        "acute-lymphoblastic-leukemia", "blood-smear", "brightfield", "transmission-light-microscopy",
        "hematology", "onnx", "pytorch", "resnet", "cross-attention")


# -- dependencies -------------------------------------------------------------------------------------------
def require_bioimageio(*, core: bool = False) -> None:
    """Raise ``ArgumentError`` naming the extra when bioimageio.spec (and bioimageio.core, with CORE) or onnx
    cannot be imported. Cheap enough to call before any work."""
    names = ["bioimageio.spec", "onnx"] + (["bioimageio.core"] if core else [])
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ArgumentError(f"{', '.join(missing)} not installed: bioimage.io packaging needs the `bioimageio` "
                            f"extra. Install it with `{EXTRA_HINT}` (bioimageio.core and onnx).")


# -- small helpers ------------------------------------------------------------------------------------------
def sample_images(samples: Path, limit: int) -> list[Path]:
    """Image files directly in SAMPLES (sorted by name), at most LIMIT; ``ArgumentError`` when there are none."""
    samples = Path(samples)
    if not samples.is_dir():
        raise ArgumentError(f"{samples}: samples folder not found. Pass --samples DIR with a few images the model "
                            "should classify (the released model's are in models/samples/).")
    files = sorted(p for p in samples.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ArgumentError(f"{samples}: no images ({', '.join(IMAGE_SUFFIXES)}) in the samples folder. Put a few "
                            "images of the kind the model classifies there, or pass another --samples DIR.")
    return files[:limit]


def _check_arguments(model: Path, out_zip: Path, samples: Path, max_test_images: int) -> None:
    if not Path(model).is_file():
        raise ModelLoadError(f"{model}: model file not found. Pass an ONNX model exported with `cadbcnn-export` "
                             "(the released one is models/cadbcnn.onnx).")
    if Path(out_zip).suffix.lower() != ".zip":
        raise ArgumentError(f"{out_zip}: the package must be a .zip file (e.g. --out cadbcnn-bioimageio.zip)")
    if Path(out_zip).is_dir():
        raise ArgumentError(f"{out_zip}: is a directory; pass a .zip file path")
    if isinstance(max_test_images, bool) or not isinstance(max_test_images, int) or max_test_images < 1:
        raise ArgumentError(f"max_test_images must be an integer >= 1, got {max_test_images!r}")
    sample_images(samples, max_test_images)


# -- the package's ONNX file --------------------------------------------------------------------------------
def probability_graph(model: Path, spec: ModelSpec, *, source_sha256: str | None = None):
    """The source ONNX model with ``probabilities = Softmax(logits / T)`` appended (an ``onnx.ModelProto``).

    Graph outputs: ``probabilities`` [batch, classes], then ``ood_score`` [batch] when the spec has one. Every
    node, initializer and ``metadata_props`` entry of the source is kept; ``cadbcnn.bioimageio`` is added.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(model))
    g = proto.graph
    temperature = temperature_of(spec.calibration)
    outputs = {o.name: o for o in g.output}
    if spec.output_name not in outputs:
        raise ExportError(f"{model}: graph has no output {spec.output_name!r}; re-export it with cadbcnn-export")
    taken = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    prefix = "cadbcnn_bioimageio"
    t_name, scaled = f"{prefix}.temperature", f"{prefix}.scaled_logits"
    clash = taken & {PROBABILITIES, t_name, scaled}
    if clash:
        raise ExportError(f"{model}: the graph already has tensor(s) {sorted(clash)}; cannot add the softmax")
    batch = outputs[spec.output_name].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.dim_value else "batch")
    g.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), name=t_name))
    g.node.extend([
        helper.make_node("Div", [spec.output_name, t_name], [scaled], name=f"{prefix}/Div"),
        helper.make_node("Softmax", [scaled], [PROBABILITIES], name=f"{prefix}/Softmax", axis=-1),
    ])
    new_outputs = [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch_dim, spec.num_classes])]
    if spec.ood is not None:
        ood = outputs.get(spec.ood["output"])
        if ood is None:
            raise ExportError(f"{model}: the spec names OOD output {spec.ood['output']!r} but the graph has none")
        new_outputs.append(ood)
    new_outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in new_outputs]
    del g.output[:]
    g.output.extend(new_outputs)
    note = {
        "derived_from": {"file": Path(model).name, "sha256": source_sha256,
                         "content_sha256": spec.content_sha256},
        "outputs": [PROBABILITIES] + ([spec.ood["output"]] if spec.ood else []),
        "probabilities": f"Softmax({spec.output_name} / T), T = {temperature!r} (the spec's calibration "
                         "temperature; 1.0 when uncalibrated)",
        "note": "bioimage.io package graph: the cadbcnn.spec entry and its content_sha256 describe the source "
                "model, so cadbcnn_runtime refuses this file; use the source model with cadbcnn-infer.",
    }
    keep = [p for p in proto.metadata_props if p.key != PACKAGE_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=PACKAGE_METADATA_KEY,
                                                            value=json.dumps(note, sort_keys=True)))
    onnx.checker.check_model(proto)
    return proto


def _run_onnx(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = make_session(path)  # the runtime's one session factory
    return sess.run(None, {sess.get_inputs()[0].name: x})


# -- cover ----------------------------------------------------------------------------------------------------
def _cover(image_rgb: np.ndarray, probs: np.ndarray, spec: ModelSpec, *, review: bool, ood: float | None,
           is_ood: bool, dest: Path) -> Path:
    """A 2:1 PNG: the image with its predicted label drawn on it, and a probability panel. At most 500 KB.
    ``review``: the runtime's ``needs_review`` for the image (every check of the model's rule, not only the
    confidence and OOD thresholds)."""
    import cv2

    k = int(np.argmax(probs))
    conf = float(probs[k])
    width, height = COVER_SIZE
    while True:
        s = height / 512.0
        side = height
        img = cv2.resize(image_rgb, (side, side), interpolation=cv2.INTER_CUBIC if side > image_rgb.shape[0]
                         else cv2.INTER_AREA)
        canvas = np.full((height, width, 3), 255, np.uint8)
        canvas[:, :side] = img
        font = cv2.FONT_HERSHEY_SIMPLEX
        label = f"{spec.class_names[k]} {100 * conf:.1f}%"
        (tw, th), base = cv2.getTextSize(label, font, 1.3 * s, max(1, round(3 * s)))
        pad = round(12 * s)
        cv2.rectangle(canvas, (0, 0), (tw + 2 * pad, th + base + 2 * pad), (0, 0, 0), -1)
        cv2.putText(canvas, label, (pad, pad + th), font, 1.3 * s, (255, 255, 255), max(1, round(3 * s)),
                    cv2.LINE_AA)
        x0 = side + round(32 * s)
        bar_w = width - x0 - round(40 * s)
        cv2.putText(canvas, f"CADBCNN {spec.version}: class probabilities", (x0, round(60 * s)), font, 0.8 * s,
                    (20, 20, 20), max(1, round(2 * s)), cv2.LINE_AA)
        for i, (name, p) in enumerate(zip(spec.class_names, probs)):
            y = round((110 + 80 * i) * s)
            cv2.putText(canvas, f"{name}  {100 * float(p):.1f}%", (x0, y), font, 0.75 * s, (20, 20, 20),
                        max(1, round(2 * s)), cv2.LINE_AA)
            top = y + round(12 * s)
            cv2.rectangle(canvas, (x0, top), (x0 + bar_w, top + round(24 * s)), (225, 225, 225), -1)
            colour = (40, 110, 200) if i == k else (150, 150, 150)
            cv2.rectangle(canvas, (x0, top), (x0 + max(1, round(bar_w * float(p))), top + round(24 * s)), colour, -1)
        flags = "needs review" if review else "no review flag"
        if ood is not None:
            flags += f" | OOD score {ood:.3g} ({'out of' if is_ood else 'in'} distribution)"
        cv2.putText(canvas, flags, (x0, round(440 * s)), font, 0.6 * s, (20, 20, 20), max(1, round(s)), cv2.LINE_AA)
        cv2.putText(canvas, "research / decision support - not a medical device", (x0, round(480 * s)), font,
                    0.6 * s, (120, 0, 0), max(1, round(s)), cv2.LINE_AA)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            raise ExportError("OpenCV could not encode the cover PNG")
        if len(buf) <= COVER_MAX_BYTES or height <= 128:
            dest.write_bytes(buf.tobytes())
            return dest
        width, height = width * 3 // 4 // 2 * 2, height * 3 // 4  # keep 2:1 exactly


# -- documentation --------------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return f"{100 * float(v):.2f} %" if isinstance(v, (int, float)) else "—"


def _documentation(spec: ModelSpec, *, temperature: float, n_test: int, source_name: str, source_sha256: str,
                   paper_ref: str) -> str:
    h, w = spec.image_size
    classes = ", ".join(f"**{c}**" for c in spec.class_names)
    ood = spec.ood
    m = spec.metrics or {}
    calib = spec.calibration
    lines = [
        f"# CADBCNN {spec.version} — acute lymphoblastic leukemia white-cell classifier",
        "",
        "**Research and decision-support software. Not a medical device; not cleared for diagnosis.** Every "
        "prediction is meant to be reviewed by a qualified person; the model routes uncertain and unfamiliar "
        "images to that person (the review flags below).",
        "",
        "## What it is",
        "",
        "A Cross-Attentive Dual-Branch CNN (CADBCNN, after Jha et al.): ResNet18 and ResNet34 trunks whose 7 × 7 "
        "feature maps are projected to tokens and fused by bidirectional multi-head cross-attention, mean-pooled, "
        f"concatenated and classified by a linear head. It classifies one {h} × {w} peripheral-blood-smear image "
        f"(a stained smear field with white cells) into {classes} (Benign = hematogones; the others are acute "
        "lymphoblastic leukemia subtypes).",
        "",
        f"Source model: `{source_name}` (sha256 `{source_sha256}`), cadbcnn spec variant `{spec.variant}`, "
        f"exported with the cadbcnn exporter (training code commit `{spec.git_commit or 'unknown'}`).",
        "",
        "## Input and output",
        "",
        f"* **Input `image`**: uint8 RGB, `[batch, 3, {h}, {w}]` (0–255). Decode the image, convert to RGB and "
        f"resize to {h} × {w} with area interpolation (OpenCV `INTER_AREA`) before the model — as the cadbcnn "
        "runtime does. Normalisation (ImageNet mean/std) is inside the graph: do not normalise.",
        f"* **Output `probabilities`**: float32 `[batch, {spec.num_classes}]`, channel names "
        f"{', '.join(spec.class_names)}: `softmax(logits / T)` with T = {temperature:.4g} "
        + (f"(temperature scaling fitted on the {calib.get('fitted_on', 'validation split')})." if calib
           else "(the model is not calibrated)."),
    ]
    if ood:
        lines.append(f"* **Output `{ood['output']}`**: float32 `[batch]`, an out-of-distribution score "
                     f"({ood.get('method', 'see the spec')}; higher = more unlike the training data). Above "
                     f"{float(ood['threshold']):.4g} ({ood.get('threshold_rule', 'the spec threshold')}) the image is "
                     "out of distribution.")
    lines += [
        "",
        "## How the review flags work",
        "",
        "The cadbcnn runtime sets `needs_review` when any of these holds; a bioimage.io consumer can reproduce the "
        "first two from the outputs (the thresholds are also in `config.cadbcnn` of the rdf):",
        "",
        f"1. the top calibrated probability is below the review threshold of the class it names: **"
        f"{describe_thresholds(review_thresholds(calib, spec.class_names, spec.review_threshold))}**"
        + (f" ({calib['review_rule']})" if calib and calib.get("review_rule") else "") + ";",
    ]
    if ood:
        lines.append(f"2. `{ood['output']}` > **{float(ood['threshold']):.4g}** (out of distribution);")
    if spec.quality:
        lines.append(f"{3 if ood else 2}. the field-content score — {spec.quality.get('measure', 'see the spec')} "
                     f"— is below **{float(spec.quality['min_content']):.3g}** (a blank or near-uniform field). This "
                     "check is computed outside the graph (`cadbcnn_runtime.quality.content_scores`); a consumer "
                     "of this package must apply it itself.")
    if spec.appearance:
        n = 2 + bool(ood) + bool(spec.quality)
        lines.append(f"{n}. the appearance score — {spec.appearance.get('measure', 'see the spec')}, Mahalanobis "
                     "distance to the training images of the predicted class divided by that class's cut — is above "
                     "**1** (colour and contrast unlike the training images of that class). Computed outside the "
                     "graph (`cadbcnn_runtime.appearance`, statistics in `config.cadbcnn.appearance`); a consumer "
                     "of this package must apply it itself.")
    score = (calib or {}).get("review_score")
    if score:
        n = 2 + bool(ood) + bool(spec.quality) + bool(spec.appearance)
        lines.append(f"{n}. the learned review score ({score.get('method', 'logistic regression')}; features: "
                     f"{score.get('features', 'see the spec')}) is below the threshold of the predicted class: **"
                     f"{describe_thresholds(score['thresholds'])}**. It replaces per-class confidence thresholds "
                     "(rule 1 then holds the floor only). Computed outside the graph (`cadbcnn_runtime.review_score`, "
                     "weights in `config.cadbcnn.review_score`); a consumer of this package must apply it itself.")
    lines += [
        "",
        "A prediction without a flag still needs the human review the intended use demands.",
        "",
        "## Intended use",
        "",
        "Classifying single peripheral-blood-smear images of the kind in the training data (Zeiss camera, 100× "
        f"objective, the same staining, {h} × {w} crops) into the four classes, as a second opinion in research "
        "or decision-support settings. **Out of scope**: other cell types, other stains, microscopes or cameras "
        "without re-validation; patient-level diagnosis; any use without a qualified human in the loop.",
        "",
        "## Data",
        "",
        f"{DATASET_CITATION} (https://doi.org/{DATASET_DOI}). Taleqani Hospital (Tehran), 89 patients, labels "
        "confirmed by flow cytometry. No patient IDs exist, so splits are image-level (exact duplicates grouped).",
    ]
    tr = spec.training or {}
    if tr.get("split_counts"):
        counts = "; ".join(f"{k} {sum(v.values())}" for k, v in tr["split_counts"].items())
        lines.append(f"\nSplit used for this model ({tr.get('split', 'see spec')}, seed {tr.get('seed', '?')}): "
                     f"{counts} images.")
    lines += ["", "## Metrics", ""]
    if m:
        lines += [
            f"On the {m.get('split', 'held-out')} split ({m.get('n', '?')} images, evaluated once, after the model "
            f"was chosen on validation): accuracy **{_pct(m.get('accuracy'))}**, macro-F1 "
            f"**{_pct(m.get('f1_macro'))}**, weighted F1 {_pct(m.get('f1_weighted'))}.",
            "",
        ]
        if m.get("per_class_f1"):
            lines += ["| class | F1 |", "|---|---:|"]
            lines += [f"| {c} | {_pct(v)} |" for c, v in m["per_class_f1"].items()]
            lines.append("")
        lines.append("These are image-level estimates on data from the training centre. A split that keeps blocks "
                     "of consecutive file numbers (a proxy for patients/sessions) together was about 3 points "
                     "lower in the project's experiments (≈ 96 %): plan with roughly 1 error in 25 on new patients "
                     "of the same centre, and expect less elsewhere.")
    else:
        lines.append("No evaluation metrics are recorded in this model's spec.")
    if calib:
        b, a = calib.get("before", {}), calib.get("after", {})
        if b and a:
            lines += ["", f"Calibration on the {calib.get('fitted_on', 'validation split')}: NLL "
                          f"{b.get('nll', float('nan')):.4f} → {a.get('nll', float('nan')):.4f}, 15-bin ECE "
                          f"{b.get('ece_15', float('nan')):.4f} → {a.get('ece_15', float('nan')):.4f}."]
    lines += [
        "",
        "## Limitations, bias and risks",
        "",
        "* **Single centre, one microscope and camera, one staining protocol.** Expect lower accuracy elsewhere. "
        "The OOD flag catches gross shifts (foreign images, strong stain shifts) but not subtle ones (mild hue "
        "shifts, desaturation, blur, JPEG artefacts, magnification changes are mostly not flagged).",
        "* **Image-level split optimism.** Without patient IDs, images of one patient can sit in both training "
        "and test; the test accuracy above is optimistic (see Metrics).",
        "* **Shortcut risk.** Background colour and illumination differ between classes in this dataset; "
        "Grad-CAM shows attention spread over background and several cells. High accuracy does not prove the "
        "model looks at the right morphology.",
        "* **Benign is the smallest class**, so its per-class estimates are the least certain.",
        "* Evaluated on images, not patients. Not a diagnosis: a wrong call can delay or misdirect care — keep a "
        "qualified person in the loop and act on the review flags.",
        "",
        "# Validation",
        "",
        f"* `bioimageio test` reproduces the packaged test outputs ({n_test} test-split sample image"
        f"{'s' if n_test != 1 else ''}, preprocessed as above) within the tolerances in "
        "`config.bioimageio.reproducibility_tolerance` (probabilities: absolute 1e-3, relative 1e-3). When the "
        "package was built, its outputs matched the cadbcnn runtime's calibrated probabilities"
        + (" and OOD scores" if ood else "") + f" on the same images within {PARITY_TOLERANCE:g}.",
        "* To validate on unseen data, classify labelled images from your own site (decode → RGB → area resize "
        f"to {h} × {w}, uint8) and compare the arg-max of `probabilities` with the labels: report accuracy, "
        "macro-F1 and the per-class confusion matrix, and the fraction of images the review flags route to a "
        "person, against the numbers above. The cadbcnn runtime does the same with the source model "
        "(`cadbcnn-infer FOLDER --model MODEL.onnx`). Do not use the model where accuracy on your images, with "
        "the review flags applied, falls short of what your use needs.",
        "* Check calibration too (reliability diagram or ECE of the top probability): a temperature fitted on "
        "your own validation images (`cadbcnn-train calibrate`) may be needed at another site.",
        "",
        "## Citations",
        "",
        f"* {paper_ref}",
        f"* {DATASET_CITATION}.",
        "",
        "## Licence",
        "",
        "Code and model: Apache-2.0. The sample images come from the dataset above; see its page for their licence.",
        "",
    ]
    return "\n".join(lines)


# -- summary of a bioimageio validation -------------------------------------------------------------------------
def format_summary(summary) -> str:
    """A compact text of a ``ValidationSummary``: status, one line per check with its errors and warnings
    (severity WARNING and above; INFO entries are only counted)."""
    lines = [f"bioimageio {summary.type} test of {summary.source_name}: {summary.status.upper()} "
             f"(format {summary.format_version})"]
    n_info = 0
    for d in summary.details:
        lines.append(f"  [{d.status}] {d.name}")
        for e in d.errors:
            loc = ".".join(str(x) for x in e.loc)
            lines.append(f"      error{f' at {loc}' if loc else ''}: {' '.join(e.msg.split())[:600]}")
        for wn in d.warnings:
            if wn.severity >= WARNING_SEVERITY:
                loc = ".".join(str(x) for x in wn.loc)
                lines.append(f"      warning{f' at {loc}' if loc else ''}: {' '.join(wn.msg.split())[:300]}")
            else:
                n_info += 1
    if n_info:
        lines.append(f"  ({n_info} info message(s); `bioimageio test PACKAGE` prints them in full)")
    return "\n".join(lines)


def test_package(zip_or_rdf: Path, *, devices: Sequence[str] | None = ("CPUExecutionProvider",)
                 ) -> tuple[bool, str]:
    """Run bioimageio.core's model test (what ``bioimageio test`` runs) on a package zip or an rdf.yaml.

    Returns (passed, summary text). DEVICES are ONNX Runtime execution providers; the default tests on the CPU,
    where the expected outputs were computed; None tests on every available provider, as ``bioimageio test``
    does.
    """
    require_bioimageio(core=True)
    from bioimageio.core import test_model

    path = Path(zip_or_rdf)
    if not path.exists():
        raise ArgumentError(f"{path}: no such package (.zip) or rdf.yaml")
    summary = test_model(path, devices=list(devices) if devices else None)
    return summary.status == "passed", format_summary(summary)


test_package.__test__ = False  # not a pytest test, despite its name


# -- the package ----------------------------------------------------------------------------------------------
def build_package(model: Path, out_zip: Path, *, samples: Path = Path("models/samples"), max_test_images: int = 8,
                  authors: Sequence[str] = ("cadbcnn contributors",), maintainer_github: str | None = None,
                  paper_doi: str | None = None, paper_url: str | None = None, git_repo: str | None = None,
                  compress: bool = False, test: bool = False, log=lambda msg: None) -> dict[str, Any]:
    """Build a bioimage.io (format 0.5) model package for MODEL at OUT_ZIP; see the module docstring.

    SAMPLES: folder whose first MAX_TEST_IMAGES images (by name) become the test tensors; the first one is the
    cover. AUTHORS: names for the rdf; MAINTAINER_GITHUB: a GitHub user name (bioimageio.spec checks it against
    the GitHub API, so it needs internet). PAPER_DOI / PAPER_URL: how to cite the Jha et al. paper (default: its
    text and a literature-search URL). COMPRESS: deflate the zip (the weights shrink by a few per cent only and
    every reader pays the decompression, so members are stored by default). TEST: also run ``test_package``.

    Returns a summary: ``path``, ``sha256`` and ``size_bytes`` of the zip, ``weights_sha256`` (the package's
    ONNX file), ``source_sha256``, ``outputs``, ``temperature``, ``test_images``, ``max_abs_diff`` (vs the
    runtime), ``seconds`` and — with TEST — ``test`` = {``passed``, ``summary``}. Raises ``ArgumentError`` /
    ``ModelLoadError`` (bad arguments, missing extra; before any work) or ``ExportError`` (package outputs
    differ from the runtime's, or the description does not validate); nothing is written then.
    """
    t0 = time.time()
    model, out_zip, samples = Path(model), Path(out_zip), Path(samples)
    _check_arguments(model, out_zip, samples, max_test_images)
    require_bioimageio(core=test)
    images = sample_images(samples, max_test_images)

    from cadbcnn_runtime.classifier import Classifier
    from cadbcnn_runtime.preprocess import read_image

    with Classifier.from_file(model, device="cpu") as clf:  # verifies the file's integrity
        spec = clf.spec
        x = np.stack([clf.preprocess(p) for p in images])
        ref_logits, ref_ood = clf.run_all(x)
        review_threshold, ood_threshold = clf.review_threshold, clf.ood_threshold
        first_pred = clf.classify(x[:1])[0]  # the cover's review flag: the runtime's whole rule
    temperature = temperature_of(spec.calibration)
    ref_probs = softmax(ref_logits, temperature)
    source_sha256 = file_sha256(model)
    log(f"{model}: {spec.name} {spec.version} ({spec.variant}), {spec.num_classes} classes, "
        f"{spec.image_size[0]}×{spec.image_size[1]}, T = {temperature:.4g}, OOD output: "
        f"{'yes' if spec.ood else 'no'}; {len(images)} test image(s) from {samples}")

    work = Path(tempfile.mkdtemp(prefix="cadbcnn-bioimageio-"))
    try:
        # 1. the package's ONNX file, checked against the runtime
        weights = work / "weights.onnx"
        proto = probability_graph(model, spec, source_sha256=source_sha256)
        import onnx

        onnx.save(proto, str(weights))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
        del proto
        outs = _run_onnx(weights, x)
        probs = outs[0]
        diffs = [float(np.abs(probs.astype(np.float64) - ref_probs).max())]
        if spec.ood is not None:
            diffs.append(float(np.abs(outs[1].astype(np.float64) - ref_ood).max()))
        max_diff = max(diffs)
        if not max_diff <= PARITY_TOLERANCE:
            raise ExportError(f"{model}: the package graph's outputs differ from cadbcnn_runtime's by {max_diff:.2e} "
                              f"(> {PARITY_TOLERANCE:g}) on the test images; nothing written")
        weights_sha256 = file_sha256(weights)
        log(f"package graph: outputs {', '.join([PROBABILITIES] + ([spec.ood['output']] if spec.ood else []))}; "
            f"max |Δ| vs runtime {max_diff:.1e}")

        # 2. test tensors, sample tensors, cover, documentation
        import tifffile

        np.save(work / "test_input_image.npy", x)
        np.save(work / f"test_output_{PROBABILITIES}.npy", probs)
        tifffile.imwrite(work / "sample_input_image.tif", x[:1], photometric="rgb", planarconfig="separate")
        tifffile.imwrite(work / f"sample_output_{PROBABILITIES}.tif", probs[:1])
        if spec.ood is not None:
            np.save(work / f"test_output_{spec.ood['output']}.npy", outs[1])
            tifffile.imwrite(work / f"sample_output_{spec.ood['output']}.tif", outs[1][:1])
        first = read_image(images[0])
        _cover(first, probs[0], spec, review=first_pred.needs_review,
               ood=None if spec.ood is None else float(outs[1][0]), is_ood=first_pred.out_of_distribution,
               dest=work / "cover.png")
        paper_ref = (f"{PAPER_TEXT} " + (f"DOI {paper_doi}" if paper_doi else (paper_url or
                     f"(no DOI on record; literature search: {PAPER_SEARCH_URL})")))
        (work / "README.md").write_text(_documentation(spec, temperature=temperature, n_test=len(images),
                                                       source_name=model.name, source_sha256=source_sha256,
                                                       paper_ref=paper_ref), encoding="utf-8")
        attachments = []
        card = model.parent / "MODEL_CARD.md"
        if card.is_file() and source_sha256 in card.read_text(encoding="utf-8", errors="replace"):
            shutil.copyfile(card, work / "MODEL_CARD.md")
            attachments.append(work / "MODEL_CARD.md")
        if (samples / "README.md").is_file():
            shutil.copyfile(samples / "README.md", work / "SAMPLES.md")
            attachments.append(work / "SAMPLES.md")

        # 3. the description, with bioimageio.spec's own classes, then the zip
        from bioimageio.spec import save_bioimageio_package

        out_zip.parent.mkdir(parents=True, exist_ok=True)
        tmp_zip = out_zip.with_name(f".{out_zip.name}.partial.zip")
        try:  # pydantic's ValidationError is a ValueError
            descr = _describe(spec, work=work, weights_sha256=weights_sha256, opset=opset, temperature=temperature,
                              review_threshold=review_threshold, ood_threshold=ood_threshold,
                              ood_max=None if spec.ood is None else float(np.max(outs[1])),
                              attachments=attachments, authors=authors, maintainer_github=maintainer_github,
                              paper_doi=paper_doi, paper_url=paper_url, git_repo=git_repo,
                              source_name=model.name, source_sha256=source_sha256)
            save_bioimageio_package(descr, output_path=tmp_zip,
                                    compression=ZIP_DEFLATED if compress else ZIP_STORED)
        except ValueError as exc:
            raise ExportError(f"bioimageio.spec refused the package description: {str(exc)[:3000]}") from None
        tmp_zip.replace(out_zip)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in out_zip.parent.glob(f".{out_zip.name}.partial.zip"):
            leftover.unlink(missing_ok=True)

    summary: dict[str, Any] = {
        "path": str(out_zip), "sha256": file_sha256(out_zip), "size_bytes": out_zip.stat().st_size,
        "weights_sha256": weights_sha256, "source": str(model), "source_sha256": source_sha256,
        "format_version": descr.format_version, "name": descr.name, "version": spec.version,
        "outputs": [PROBABILITIES] + ([spec.ood["output"]] if spec.ood else []), "temperature": temperature,
        "test_images": [p.name for p in images], "max_abs_diff": max_diff,
        "predictions": [spec.class_names[int(k)] for k in probs.argmax(1)],
    }
    log(f"wrote {out_zip} ({summary['size_bytes'] / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    if test:
        passed, text = test_package(out_zip)
        summary["test"] = {"passed": passed, "summary": text}
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def _describe(spec: ModelSpec, *, work: Path, weights_sha256: str, opset: int, temperature: float,
              review_threshold: float, ood_threshold: float | None, ood_max: float | None, attachments: list[Path],
              authors: Sequence[str], maintainer_github: str | None, paper_doi: str | None,
              paper_url: str | None, git_repo: str | None, source_name: str, source_sha256: str):
    from bioimageio.spec.model import v0_5 as bio

    def file(name: str):
        p = work / name
        return bio.FileDescr(source=p, sha256=bio.Sha256(file_sha256(p)))

    h, w = spec.image_size
    inputs = [bio.InputTensorDescr(
        id=bio.TensorId(spec.input_name),
        description=f"RGB blood-smear image, uint8 0-255, resized to {h}x{w} (area); normalised inside the graph",
        axes=[bio.BatchAxis(),
              bio.ChannelAxis(channel_names=["r", "g", "b"]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=h),
              bio.SpaceInputAxis(id=bio.AxisId("x"), size=w)],
        data=bio.IntervalOrRatioDataDescr(type="uint8", range=(0, 255), unit="arbitrary unit"),
        test_tensor=file("test_input_image.npy"),
        sample_tensor=file("sample_input_image.tif"),
    )]
    outputs = [bio.OutputTensorDescr(
        id=bio.TensorId(PROBABILITIES),
        description=f"calibrated class probabilities softmax(logits / {temperature:.4g}); "
                    f"review below {review_threshold:.3g}"[:128],
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=list(spec.class_names), description="class")],
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0), unit="arbitrary unit"),
        test_tensor=file(f"test_output_{PROBABILITIES}.npy"),
        sample_tensor=file(f"sample_output_{PROBABILITIES}.tif"),
    )]
    tolerances = [bio.ReproducibilityTolerance(relative_tolerance=PROB_RTOL, absolute_tolerance=PROB_ATOL,
                                               mismatched_elements_per_million=0,
                                               output_ids=[bio.TensorId(PROBABILITIES)])]
    if spec.ood is not None:
        name = spec.ood["output"]
        outputs.append(bio.OutputTensorDescr(
            id=bio.TensorId(name),
            description=f"out-of-distribution score ({spec.ood.get('method', 'see config')}); above "
                        f"{ood_threshold:.4g} = out of distribution, needs review"[:128],
            axes=[bio.BatchAxis()],
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, None), unit="arbitrary unit"),
            test_tensor=file(f"test_output_{name}.npy"),
            sample_tensor=file(f"sample_output_{name}.tif"),
        ))
        atol = min(1e-3, 0.01 * ood_max) if ood_max and ood_max > 0 else 0.0
        tolerances.append(bio.ReproducibilityTolerance(relative_tolerance=OOD_RTOL, absolute_tolerance=atol,
                                                       mismatched_elements_per_million=0,
                                                       output_ids=[bio.TensorId(name)]))
    if paper_doi:
        paper = bio.CiteEntry(text=PAPER_TEXT, doi=bio.Doi(paper_doi), url=bio.HttpUrl(paper_url) if paper_url
                              else None)
    else:
        paper = bio.CiteEntry(text=PAPER_TEXT + ("" if paper_url else " No DOI on record; the URL is a literature "
                                                 "search."), url=bio.HttpUrl(paper_url or PAPER_SEARCH_URL))
    dataset = bio.CiteEntry(text=DATASET_CITATION.split(" DOI:")[0], doi=bio.Doi(DATASET_DOI))
    tr = spec.training or {}
    cfg_cadbcnn = {
        "source_model": {"file": source_name, "sha256": source_sha256, "content_sha256": spec.content_sha256,
                         "variant": spec.variant, "git_commit": spec.git_commit},
        "class_names": list(spec.class_names),
        "preprocessing": f"decode with OpenCV, convert to RGB, resize to {h}x{w} with INTER_AREA, CHW uint8",
        "temperature": float(temperature),
        "review_threshold": float(review_threshold),
        "review_thresholds": review_thresholds(spec.calibration, spec.class_names, review_threshold),
        "review_rule": "needs_review = max(probabilities) < review_thresholds[class_names[argmax(probabilities)]]"
                       + (f" or {spec.ood['output']} > ood_threshold" if spec.ood else "")
                       + (" or field-content score < quality.min_content (computed outside the graph)"
                          if spec.quality else "")
                       + (" or appearance score > 1 (appearance statistics, computed outside the graph)"
                          if spec.appearance else "")
                       + (" or learned review score < review_score.thresholds[label] (computed outside the graph)"
                          if (spec.calibration or {}).get("review_score") else ""),
        "review_score": json.loads(json.dumps(dict((spec.calibration or {}).get("review_score") or {}))) or None,
        "ood_threshold": None if ood_threshold is None else float(ood_threshold),
        "quality": None if spec.quality is None else json.loads(json.dumps(dict(spec.quality))),
        "appearance": None if spec.appearance is None else json.loads(json.dumps(dict(spec.appearance))),
        "metrics": None if spec.metrics is None else json.loads(json.dumps(dict(spec.metrics))),
    }
    limitations = ("Single centre, one microscope, camera and staining protocol; image-level split (no patient "
                   "IDs), so test accuracy is optimistic; background colour and illumination are class shortcuts "
                   "in this dataset; Benign is the smallest class. The OOD flag catches gross shifts, not subtle "
                   f"ones. Only blood-smear images of this kind, resized to {h}x{w}, are in scope.")
    config = bio.Config(
        bioimageio=bio.BioimageioConfig(
            reproducibility_tolerance=tolerances,
            architecture_type="dual-branch CNN + cross-attn",
            architecture_description="ResNet18 and ResNet34 trunks; 7x7x512 feature maps projected to 256-d tokens; "
                                     "bidirectional 8-head cross-attention with residual + LayerNorm; mean-pooled, "
                                     "concatenated (512-d), dropout, linear head (after Jha et al.).",
            modality="brightfield (transmission light) microscopy of stained peripheral blood smears, 100x",
            target_structure=["white blood cells", "lymphoblasts"],
            task="image classification (4 classes)",
            out_of_scope_use="Diagnosis without a qualified person; other cell types, stains, microscopes or "
                             "cameras without re-validation; patient-level decisions.",
            bias_risks_limitations=bio.BiasRisksLimitations(
                known_biases="Trained on one hospital's images (Taleqani Hospital, Tehran; 89 patients): one "
                             "microscope, camera and stain. Background colour and illumination differ between "
                             "classes, a shortcut the model may use.",
                risks="Over-trusting confident outputs; applying the model to images from other sites or "
                      "preparations; treating an image-level classification as a patient diagnosis.",
                limitations=limitations,
                recommendations="Keep a qualified person in the loop; act on the review flags (low calibrated "
                                "confidence, out-of-distribution score, blank fields); validate on local labelled "
                                "images before use (see the documentation's Validation section)."),
            training=bio.TrainingDetails(
                training_preprocessing="decode, RGB, area resize to the model size; flips, 90-degree rotations, "
                                       "random-resized crop, brightness/contrast and per-channel jitter",
                training_epochs=float(tr["epochs"]) if isinstance(tr.get("epochs"), (int, float)) else None,
                loss_function="class-weighted cross-entropy with label smoothing",
                optimizer="AdamW"),
        ),
        cadbcnn=cfg_cadbcnn,
    )
    h_, w_ = spec.image_size
    return bio.ModelDescr(
        name="CADBCNN leukemia white-cell classifier",
        description=(f"Cross-Attentive Dual-Branch CNN (ResNet18 + ResNet34 fused by cross-attention, after Jha et "
                     f"al.) classifying one {h_}x{w_} peripheral-blood-smear image of white cells into "
                     f"{', '.join(spec.class_names)} (acute lymphoblastic leukemia subtypes vs benign "
                     "hematogones). Outputs calibrated class probabilities"
                     + (" and an out-of-distribution score" if spec.ood else "")
                     + ". Research / decision support only, not a medical device.")[:512],
        authors=[bio.Author(name=a) for a in authors],
        maintainers=[bio.Maintainer(github_user=maintainer_github)] if maintainer_github else [],
        cite=[paper, dataset],
        license=bio.LicenseId("Apache-2.0"),
        tags=list(TAGS),
        version=spec.version,
        documentation=file("README.md"),
        covers=[file("cover.png")],
        attachments=[file(p.name) for p in attachments],
        git_repo=bio.HttpUrl(git_repo) if git_repo else None,
        inputs=inputs,
        outputs=outputs,
        weights=bio.WeightsDescr(onnx=bio.OnnxWeightsDescr(
            source=work / "weights.onnx", sha256=bio.Sha256(weights_sha256), opset_version=opset,
            comment=f"{source_name} (sha256 {source_sha256[:16]}...) with Softmax(logits / T) appended; "
                    "original metadata_props kept")),
        config=config,
    )
