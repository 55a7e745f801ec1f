"""Silent errors under distribution shift: how often does the model give a wrong label without asking for review?

Runs an exported ONNX model through the runtime's own ``Classifier`` (so
``needs_review`` and ``out_of_distribution`` are exactly what users get) on:

* the clean images of one split of the model's training run;
* the same images under acquisition shifts — magnification, stain, exposure,
  focus, compression, another camera's white balance, sensor noise. Every
  shifted image keeps its class label, so accuracy and silent errors are known;
* the scale-bar shortcut: the same images with the printed scale-bar corner
  covered, and with the corner of an image of another class pasted in (the
  share of labels that move to that class measures the shortcut);
* blank / near-uniform fields (no cell at all): any malignant label without
  review is a silent error;
* external folders (``PATH`` or ``PATH:healthy``): labelled when their
  sub-folders are the model's class folders; with ``:healthy`` every image is
  benign, so any malignant label without review is a silent error. External
  images are for reporting only: nothing is fitted on them.

A *silent error* is a wrong label with ``needs_review`` false; see
``cadbcnn_runtime.reliability``. Outputs: ``shift_report.json``,
``shift_report.md``, ``reliability.png`` and ``risk_coverage.png`` (clean split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from cadbcnn_runtime.calibration import describe_thresholds, review_thresholds
from cadbcnn_runtime.classifier import Classifier
from cadbcnn_runtime.errors import DatasetError, ImageError, ModelSpecError
from cadbcnn_runtime.evaluation import (
    Outputs,
    clean_metrics,
    plot_reliability,
    plot_risk_coverage,
    run_model,
)
from cadbcnn_runtime.decode import image_files
from cadbcnn_runtime.preprocess import IMAGE_SUFFIXES, read_image
from cadbcnn_runtime.reliability import expected_calibration_error, silent_error_stats
from cadbcnn_runtime.spec import ModelSpec

from . import data as D
from .shifts import SHIFTS, Shift, image_rng, shifted  # noqa: F401  (Shift: re-exported for scripts and tests)
from .transforms import erase_scalebar, paste_scalebar, sensor_noise

BENIGN = "Benign"

# ---------------------------------------------------------------------------
# The scale-bar shortcut: the printed corner box's text colour differs by class (transforms.SCALEBAR_BOX)
# ---------------------------------------------------------------------------
SCALEBAR_COVERED = "scale bar covered (image median colour)"
SCALEBAR_SWAPPED = "scale bar of another class's image"


def scalebar_donors(truth: np.ndarray, seed: int) -> np.ndarray:
    """For every image, the index of an image of another class whose scale-bar corner it gets (drawn per image
    from ``image_rng``, so independent of order and of the other sets); -1 when no other class is present."""
    truth = np.asarray(truth)
    donors = np.full(len(truth), -1, np.int64)
    for i, t in enumerate(truth):
        others = np.flatnonzero(truth != t)
        if len(others):
            donors[i] = others[image_rng(seed, SCALEBAR_SWAPPED, i).integers(len(others))]
    return donors


def swapped_scalebars(images: Sequence[np.ndarray], donors: np.ndarray) -> Iterator[np.ndarray]:
    for img, j in zip(images, donors):
        yield img if j < 0 else paste_scalebar(img, images[j])


def donor_shift(swapped: Outputs, clean: Outputs, truth: np.ndarray, donors: np.ndarray) -> dict[str, Any]:
    """How far the label follows the pasted corner: the share of images (with a donor) whose label became the
    donor's class, of all images and of those not reviewed. 0 for a model that ignores the scale bar."""
    has = donors >= 0
    if not has.any():
        return {"moved_to_donor_class": None, "moved_to_donor_class_silent": None}
    donor_class = np.asarray(truth)[donors[has]]
    moved = (swapped.index[has] == donor_class) & (clean.index[has] != donor_class)
    return {"moved_to_donor_class": float(moved.mean()),
            "moved_to_donor_class_silent": float((moved & ~swapped.needs_review[has]).mean())}


def scalebar_sets(clf: Classifier, images: Sequence[np.ndarray], truth: np.ndarray, clean: Outputs, *,
                  benign_index: int, seed: int, keep: Callable[..., None] | None = None) -> dict[str, dict[str, Any]]:
    """The two shortcut sets: the corner covered, and another class's corner pasted in (with ``donor_shift``).
    ``keep(name, outputs, truth, healthy, kind, severity)``, if given, receives each set's per-image outputs."""
    kw = dict(healthy=False, benign_index=benign_index, kind="scale bar", severity="shortcut")
    covered = run_model(clf, (erase_scalebar(im) for im in images))
    donors = scalebar_donors(truth, seed)
    swapped = run_model(clf, swapped_scalebars(images, donors))
    if keep is not None:
        keep(SCALEBAR_COVERED, covered, truth, False, "scale bar", "shortcut")
        keep(SCALEBAR_SWAPPED, swapped, truth, False, "scale bar", "shortcut")
    return {SCALEBAR_COVERED: set_result(covered, truth, **kw),
            SCALEBAR_SWAPPED: {**set_result(swapped, truth, **kw), **donor_shift(swapped, clean, truth, donors)}}


# ---------------------------------------------------------------------------
# Blank / near-uniform fields (no cell): healthy semantics
# ---------------------------------------------------------------------------
GREY_LEVELS = tuple(int(round(v)) for v in np.linspace(0, 255, 17))
#: Tinted fields: 11 hues × 3 values at a low saturation (the colours of an empty smear background).
TINTS = tuple((int(h), 60, v) for h in np.linspace(0, 180, 11, endpoint=False) for v in (110, 170, 230))


def blank_fields(size: tuple[int, int], *, noise: bool, seed: int = 0) -> list[np.ndarray]:
    """Uniform grey levels 0…255 and tinted uniform fields (50 images), optionally with sensor noise σ=10."""
    h, w = size
    fields = [np.full((h, w, 3), g, np.uint8) for g in GREY_LEVELS]
    for hsv in TINTS:
        colour = cv2.cvtColor(np.array([[hsv]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
        fields.append(np.full((h, w, 3), colour, np.uint8))
    if noise:
        fields = [sensor_noise(f, image_rng(seed, "blank fields + noise", i)) for i, f in enumerate(fields)]
    return fields


# ---------------------------------------------------------------------------
# External folders
# ---------------------------------------------------------------------------
@dataclass
class ExternalFolder:
    """Images of one external folder; ``truth`` per image when labelled, else None."""

    path: Path
    healthy: bool
    files: list[Path]
    truth: list[int] | None
    read: list[int] = field(default_factory=list)                    # indices of files decoded so far
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def name(self) -> str:
        tag = "healthy" if self.healthy else ("labelled" if self.truth is not None else "unlabelled")
        return f"external: {self.path.name} ({tag})"


def parse_external(arg: str) -> tuple[Path, bool]:
    """``PATH`` or ``PATH:healthy`` → (path, healthy)."""
    head, sep, tail = arg.rpartition(":")
    if sep and tail == "healthy":
        return Path(head), True
    return Path(arg), False


def require_external_dir(path: Path) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: external folder not found. Pass --external DIR or DIR:healthy with an "
                           "existing folder of images.")


def scan_external(path: Path, healthy: bool, class_folders: Sequence[str]) -> ExternalFolder:
    """Find the images under ``path`` (recursively) and decide how the folder is labelled.

    Labelled when not ``healthy`` and every image lies in a top-level sub-folder
    named like one of the model's class folders; otherwise unlabelled.
    """
    require_external_dir(path)
    files = image_files(path)
    if not files:
        raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found in this external folder "
                           "or below it; point --external at a folder of images.")
    top = [f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else None for f in files]
    truth = None
    if not healthy and all(t in class_folders for t in top):
        truth = [list(class_folders).index(t) for t in top]
    return ExternalFolder(path, healthy, files, truth)


def read_files(folder: ExternalFolder) -> Iterator[np.ndarray]:
    """Decode the folder's files one at a time (streamed: a folder may not fit in memory). Records the index
    of each decoded file in ``folder.read`` and each unreadable one in ``folder.unreadable``."""
    for i, f in enumerate(folder.files):
        try:
            img = read_image(f)
        except ImageError as exc:
            folder.unreadable.append((str(f), str(exc)))
            continue
        folder.read.append(i)
        yield img


# ---------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------
def set_result(out: Outputs, truth: np.ndarray | None, *, healthy: bool, benign_index: int,
               kind: str, severity: str) -> dict[str, Any]:
    """Silent-error statistics (and ECE for labelled sets) of one evaluated set."""
    r = {"kind": kind, "severity": severity,
         **silent_error_stats(out.index, truth, out.needs_review, healthy=healthy, benign_index=benign_index,
                              out_of_distribution=out.ood)}
    r["ece"] = (expected_calibration_error(out.confidence, out.index == truth)
                if truth is not None and len(truth) else None)
    r["appearance_rate"] = (None if out.atypical_appearance is None or not len(out.atypical_appearance)
                            else float(out.atypical_appearance.mean()))
    return r


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def class_folders(spec: ModelSpec) -> tuple[str, ...]:
    """The dataset folder of each output class (from the spec's training summary, else the known ALL names)."""
    folders = (spec.training or {}).get("class_folders")
    if folders:
        return tuple(folders)
    by_name = {v: k for k, v in D.KNOWN_CLASSES.items()}
    return tuple(by_name.get(n, n) for n in spec.class_names)


def benign_index(spec: ModelSpec, model: Path) -> int:
    if BENIGN not in spec.class_names:
        raise ModelSpecError(f"{model}: has no {BENIGN!r} class ({list(spec.class_names)}); shift-report needs it "
                             "to count malignant labels on healthy and blank images. Use a cadbcnn ALL model.")
    return spec.class_names.index(BENIGN)


def subsample(rows: list[dict[str, str]], limit: int | None) -> list[dict[str, str]]:
    """At most ``limit`` rows, evenly strided through the file (deterministic; covers every class)."""
    if not limit or limit >= len(rows):
        return rows
    return rows[:: max(1, len(rows) // limit)][:limit]


def load_split(data: Path, split_file: Path, split: str, folders: Sequence[str],
               limit: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Decoded images and class indices of one split of ``split_file`` (paths relative to ``data``)."""
    if not data.is_dir():
        raise DatasetError(f"{data}: dataset folder not found. Pass --data DIR, the dataset root the split "
                           "file's paths are relative to.")
    rows = [r for r in D.split_rows(split_file) if r["split"] == split]
    if not rows:
        raise DatasetError(f"{split_file}: has no rows of split {split!r}; use one of {', '.join(D.SPLITS)}")
    rows = subsample(rows, limit)
    images, labels = [], []
    for r in rows:
        if r["label"] not in folders:
            raise DatasetError(f"{split_file}: label {r['label']!r} of {r['path']} is not one of the model's class "
                               f"folders {list(folders)}; pass the split file of this model's training run.")
        try:
            images.append(read_image(data / r["path"]))
        except ImageError as exc:
            raise DatasetError(f"{exc} — listed in {split_file}; pass the --data root this split was made "
                               "from.") from None
        labels.append(list(folders).index(r["label"]))
    return images, np.array(labels, np.int64)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------
def _severity_summary(sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pooled silent-error rate and the worst set of each group of sets."""
    out = {}
    for sev in ("mild", "strong", "shortcut", "blank", "external"):
        rows = {k: r for k, r in sets.items() if r["severity"] == sev and r["silent_errors"] is not None and r["n"]}
        if rows:
            n = sum(r["n"] for r in rows.values())
            worst = max(rows, key=lambda k: rows[k]["silent_error_rate"])
            out[sev] = {"sets": len(rows), "n": n,
                        "silent_error_rate": sum(r["silent_errors"] for r in rows.values()) / n,
                        "review_rate": sum(r["review_rate"] * r["n"] for r in rows.values()) / n,
                        "worst_set": worst, "worst_silent_error_rate": rows[worst]["silent_error_rate"]}
    return out


def shift_report(model: Path, data: Path, split_file: Path, out: Path, *, split: str = "test",
                 externals: Sequence[str] = (), limit: int | None = None, seed: int = 0,
                 threads: int | None = None, predictions: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build every set, run the model, write the report files into ``out``; return the JSON dict. With
    ``predictions``, also ``predictions.csv``: one row per image of every set (``PREDICTION_COLUMNS``)."""
    model, data, out = Path(model), Path(data), Path(out)
    folders_of_externals = [parse_external(e) for e in externals]
    for path, _ in folders_of_externals:  # fail before the slow part
        require_external_dir(path)
    clf = Classifier.from_file(model, device="cpu", threads=threads)
    spec = clf.spec
    folders = class_folders(spec)
    benign = benign_index(spec, model)
    images, truth = load_split(data, split_file, split, folders, limit)
    ext = [scan_external(p, h, folders) for p, h in folders_of_externals]
    log(f"{split} split: {len(images)} images; {len(SHIFTS)} shifts, 2 scale-bar sets, 2 blank-field sets, {len(ext)} external folders")

    sets: dict[str, dict[str, Any]] = {}
    kept: list[tuple] = []  # (name, outputs, truth, healthy, kind, severity) of every set, for predictions.csv

    def keep(name, res, t, healthy, kind, severity) -> None:
        if predictions:
            kept.append((name, res, t, healthy, kind, severity))

    def add(name: str, res: Outputs, t: np.ndarray | None, *, healthy: bool, kind: str, severity: str) -> None:
        keep(name, res, t, healthy, kind, severity)
        sets[name] = set_result(res, t, healthy=healthy, benign_index=benign, kind=kind, severity=severity)

    clean = run_model(clf, images)
    add(f"clean {split} split", clean, truth, healthy=False, kind="clean", severity="clean")
    for s in SHIFTS:
        log(f"  {s.name}")
        add(s.name, run_model(clf, shifted(s, images, seed)), truth, healthy=False, kind=s.kind, severity=s.severity)
    log("  scale-bar shortcut: covered, and another class's pasted in")
    sets.update(scalebar_sets(clf, images, truth, clean, benign_index=benign, seed=seed, keep=keep))
    for noise in (False, True):
        name = "blank / uniform fields" + (" + sensor noise σ=10" if noise else "")
        add(name, run_model(clf, blank_fields(spec.image_size, noise=noise, seed=seed)), None, healthy=True,
            kind="blank", severity="blank")
    for e in ext:
        log(f"  {e.name}")
        res = run_model(clf, read_files(e))
        t = None if e.truth is None else np.array([e.truth[i] for i in e.read], np.int64)
        add(e.name, res, t, healthy=e.healthy, kind="external", severity="external")
        sets[e.name].update(path=str(e.path), files=len(e.files), unreadable=len(e.unreadable),
                            unreadable_files=[{"path": p, "error": m} for p, m in e.unreadable])

    result = {
        "model": str(model), "split": split, "split_file": str(split_file), "data": str(data), "limit": limit,
        "seed": seed, "class_names": list(spec.class_names), "benign_class": BENIGN,
        "review_threshold": clf.review_threshold, "ood_threshold": clf.ood_threshold,
        "temperature": clf.temperature, "calibration": spec.calibration,
        "silent_error": "wrong label with needs_review false; on healthy and blank sets any label other than "
                        f"{BENIGN!r} with needs_review false",
        "sets": sets, "summary": _severity_summary(sets),
        "clean": clean_metrics(clean, truth, clf.review_threshold),
    }
    write_report(result, out)
    if predictions:
        write_predictions(kept, spec.class_names, out / "predictions.csv")
    return result


#: Columns of ``predictions.csv`` before the per-class probabilities (``p_<class name>``, calibrated, in the
#: spec's class order). ``truth`` is empty for unlabelled images; ``healthy`` is 1 where every image of the set
#: is known to be benign (blank fields, ``DIR:healthy``); ``ood_score`` and ``low_content`` are empty when the
#: model has no OOD output or no field-content check.
PREDICTION_COLUMNS = ("set", "kind", "severity", "image", "truth", "healthy", "label", "confidence", "ood_score",
                      "out_of_distribution", "low_content", "atypical_appearance", "needs_review")


def write_predictions(kept: Sequence[tuple], class_names: Sequence[str], path: Path) -> None:
    """One row per image of every set — the raw material for other review rules (scripts/review_rules.py)."""
    import csv

    def opt(a: np.ndarray | None, i: int, fmt=lambda v: v):
        return "" if a is None else fmt(a[i])

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*PREDICTION_COLUMNS, *(f"p_{n}" for n in class_names)])
        for name, res, truth, healthy, kind, severity in kept:
            for i in range(len(res.index)):
                w.writerow([name, kind, severity, i, "" if truth is None else class_names[int(truth[i])],
                            int(healthy), class_names[int(res.index[i])], f"{res.confidence[i]:.6g}",
                            opt(res.ood_score, i, lambda v: f"{v:.6g}"), opt(res.ood, i, int),
                            opt(res.low_content, i, int), opt(res.atypical_appearance, i, int),
                            int(res.needs_review[i]),
                            *(f"{v:.6g}" for v in res.probs[i])])


def write_report(result: dict[str, Any], out: Path) -> None:
    """Write the JSON, the markdown table and both plots — all rendered from ``result`` alone."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift_report.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "shift_report.md").write_text(report_markdown(result), encoding="utf-8")
    title = f"{Path(result['model']).name} — clean {result['split']} split"
    plot_reliability(result["clean"], out / "reliability.png", title)
    plot_risk_coverage(result["clean"], result["review_threshold"], out / "risk_coverage.png", title)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def _silent(r: dict[str, Any]) -> str:
    if r["silent_errors"] is None:
        return "—"
    return f"**{r['silent_errors']}** ({_pct(r['silent_error_rate'])} %)"


def _kept(r: dict[str, Any]) -> str:
    return "—" if r["accuracy_non_reviewed"] is None else f"{_pct(r['accuracy_non_reviewed'])} ({r['n_non_reviewed']})"


def report_markdown(result: dict[str, Any]) -> str:
    """The header (what silent error means, the model's thresholds) and one table of every set."""
    thr, ood, t = result["review_threshold"], result["ood_threshold"], result["temperature"]
    per_class = review_thresholds(result.get("calibration"), result["class_names"], thr)
    thr_text = f"{thr:.2f}" if len(set(per_class.values())) == 1 else (
        "the threshold of its label (" + describe_thresholds(per_class) + ")")
    malignant = ", ".join(n for n in result["class_names"] if n != result["benign_class"])
    looks = any(r.get("appearance_rate") is not None for r in result["sets"].values())
    c = result["clean"]
    lines = [
        f"# Shift report — `{Path(result['model']).name}`", "",
        "**Silent error** = a wrong label with `needs_review` false. For images of a known class: label ≠ truth. "
        f"For healthy external images and blank fields: any malignant label ({malignant}) without review. "
        "Rates are fractions of all images of the set; *review %* is the price paid for them.", "",
        f"The model reviews an image when its confidence < **{thr_text}**"
        + (f" or its OOD score > **{ood:.4f}**" if ood is not None else "")
        + (" or its colour and contrast are unlike the training images of its label (appearance check, *look %*)"
           if looks else "")
        + (" or its learned review score is below the threshold of its label ("
           + describe_thresholds(result["calibration"]["review_score"]["thresholds"]) + ")"
           if (result.get("calibration") or {}).get("review_score") else "") + "; "
        + (f"softmax temperature **{t:.3f}** ({result['calibration'].get('fitted_on', 'fitted')})."
           if result.get("calibration") else "softmax of the raw logits (the spec has no calibration: T = 1).")
        + f" Shifted sets are the {result['split']} split's images, each keeping its class label"
        + (f" (limited to {result['limit']})" if result["limit"] else "") + f"; seed {result['seed']}.", "",
        f"Clean {result['split']} split: NLL {c['nll']:.4f}, Brier {c['brier']:.4f}, ECE {c['ece']:.4f}, "
        f"AURC {c['aurc']:.5f}.", "",
        "| set | kind | severity | n | accuracy % | review % | OOD % | " + ("look % | " if looks else "")
        + "malignant % | silent errors (%) | accuracy non-reviewed % (n) | ECE |",
        "|---|---|---|---:|---:|---:|---:|" + ("---:|" if looks else "") + "---:|---:|---:|---:|",
    ]
    for name, r in result["sets"].items():
        extra = f" — {r['unreadable']} unreadable" if r.get("unreadable") else ""
        ece = "—" if r["ece"] is None else f"{r['ece']:.3f}"
        lines.append(f"| {name}{extra} | {r['kind']} | {r['severity']} | {r['n']} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['review_rate'])} | {_pct(r['ood_rate'])} | "
                     + (f"{_pct(r.get('appearance_rate'))} | " if looks else "")
                     + f"{_pct(r['malignant_rate'])} | {_silent(r)} | "
                     f"{_kept(r)} | {ece} |")
    sw = result["sets"].get(SCALEBAR_SWAPPED)
    if sw and sw.get("moved_to_donor_class") is not None:
        lines += ["", f"*{SCALEBAR_SWAPPED}*: each image gets the scale-bar corner of a random image of another "
                  f"class; the label moved to that image's class for **{_pct(sw['moved_to_donor_class'])} %** of "
                  f"them ({_pct(sw['moved_to_donor_class_silent'])} % without review). A model that does not read "
                  "the scale bar scores 0 here."]
    lines += ["", "Pooled over each group of sets:", "", "| group | sets | images | review % | silent errors % | worst set |",
              "|---|---:|---:|---:|---:|---|"]
    for sev, s in result["summary"].items():
        lines.append(f"| {sev} | {s['sets']} | {s['n']} | {_pct(s['review_rate'])} | {_pct(s['silent_error_rate'], 2)} | "
                     f"{s['worst_set']} ({_pct(s['worst_silent_error_rate'])} %) |")
    return "\n".join(lines) + "\n"
