"""`cadbcnn-infer validate FOLDER`: is this model safe on *your* images? Torch-free.

A lab points it at its own images — labelled (class sub-folders, local names mapped to the model's classes
with ``class_map``), all healthy (``healthy=True``: any malignant label is an error), or unlabelled — and
gets accuracy and per-class metrics where labels allow, the review rate, the OOD rate, silent errors (a wrong
label with ``needs_review`` false), calibration, and a plain verdict by the rule in ``RULES``, written out
in the report (Markdown + JSON, and the reliability diagram, risk–coverage curve and OOD-score plot as PNGs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .calibration import describe_thresholds
from .classifier import Classifier
from .errors import ArgumentError, CadbcnnError, DatasetError
from .evaluation import Outputs, clean_metrics, outputs_of, plot_reliability, plot_risk_coverage
from .decode import image_files
from .preprocess import IMAGE_SUFFIXES
from .reliability import macro_f1, silent_error_stats

BENIGN = "Benign"
USABLE, REFIT, FINE_TUNE, DO_NOT_USE = "usable here", "refit the OOD flag", "fine-tune first", "do not use"

# The verdict rule: thresholds in one place, rendered into every report.
RULES = {
    "max_silent_error_rate": 0.005,   # usable: silent errors ≤ 0.5 % of images
    "max_review_rate": 0.10,          # usable: at most 10 % of images sent to review
    "min_accuracy": 0.97,             # below: the classifier itself is off at this site → fine-tune
    "stop_silent_error_rate": 0.02,   # above: confidently wrong too often → do not use as is
    "max_ood_rate": 0.05,             # unlabelled/healthy: more flagged than this → refit the flag
    "min_images": 30,                 # fewer images cannot support a verdict
}


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """``["healthy=Benign", …]`` → ``{"healthy": "Benign"}``; refused before any work when malformed."""
    out = {}
    for item in items:
        local, sep, ours = item.partition("=")
        if not sep or not local or not ours:
            raise ArgumentError(f"--class-map {item!r}: write LOCAL_FOLDER=CLASS, e.g. healthy={BENIGN}")
        out[local] = ours
    return out


def rule_text() -> list[str]:
    r = RULES
    pct = lambda v: f"{100 * v:g} %"  # noqa: E731
    return [
        f"fewer than {r['min_images']} readable images → no verdict (validate on more images)",
        f"labelled or healthy set: silent-error rate > {pct(r['stop_silent_error_rate'])} → **{DO_NOT_USE}** "
        "(confidently wrong too often; fine-tune on your labelled images, then validate again)",
        f"labelled set: accuracy < {pct(r['min_accuracy'])} → **{FINE_TUNE}** (`cadbcnn-train fit --init MODEL.onnx`; "
        "or first, without labels, `cadbcnn-export adapt-bn`, then validate again)",
        f"review rate > {pct(r['max_review_rate'])} and the OOD flag or the appearance check (what refit-ood refits) "
        f"flags at least half of the reviews (or, without labels, OOD rate > {pct(r['max_ood_rate'])}) → "
        f"**{REFIT}** (`cadbcnn-export refit-ood`)",
        f"review rate > {pct(r['max_review_rate'])} otherwise, or silent-error rate > "
        f"{pct(r['max_silent_error_rate'])} → **{FINE_TUNE}**",
        f"otherwise → **{USABLE}** (unlabelled sets: unverified until a labelled sample confirms it)",
    ]


@dataclass
class LocalSet:
    paths: list[Path]
    truth: np.ndarray | None          # class index per image, None when unlabelled
    healthy: bool
    folders: dict[str, str]           # local sub-folder → model class (labelled sets)


def local_class_names(class_names: Sequence[str], class_folders: Sequence[str],
                      class_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """Local sub-folder name → class name: the model's class names, its training folders (e.g. ``Early``) and
    CLASS_MAP (``--class-map LOCAL=CLASS``, refused when CLASS is not one of the model's)."""
    names = {**{f: c for f, c in zip(class_folders, class_names)}, **{c: c for c in class_names}}
    for local, ours in (class_map or {}).items():
        if ours not in class_names:
            raise ArgumentError(f"--class-map {local}={ours}: {ours!r} is not one of the model's classes "
                                f"({', '.join(class_names)})")
        names[local] = ours
    return names


def scan(folder: Path, class_names: Sequence[str], class_folders: Sequence[str], *,
         class_map: Mapping[str, str] | None = None, healthy: bool = False) -> LocalSet:
    """The images under FOLDER and their labels: sub-folders named like a class (or its training folder, or
    mapped by CLASS_MAP) give labels; a folder without sub-folders is unlabelled (or all healthy)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArgumentError(f"{folder}: folder not found")
    names = local_class_names(class_names, class_folders, class_map)
    files = image_files(folder)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    subdirs = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    if healthy or not subdirs:
        if class_map:
            raise ArgumentError("--class-map needs class sub-folders; this set is " +
                                ("all healthy (--healthy)" if healthy else "unlabelled (no sub-folders)"))
        return LocalSet(files, None, healthy, {})
    unknown = [d for d in subdirs if d not in names]
    loose = [p for p in files if len(p.relative_to(folder).parts) == 1]
    if unknown or loose:
        what = (f"sub-folder(s) {unknown} are not classes of the model ({', '.join(class_names)})" if unknown
                else f"{len(loose)} image(s) lie outside the class sub-folders (e.g. {loose[0].name})")
        raise ArgumentError(f"{folder}: {what}. Map local names with --class-map LOCAL=CLASS (e.g. "
                            f"--class-map healthy={BENIGN}), or move the images into class sub-folders")
    index = {c: k for k, c in enumerate(class_names)}
    truth = np.array([index[names[p.relative_to(folder).parts[0]]] for p in files], np.int64)
    return LocalSet(files, truth, False, {d: names[d] for d in subdirs})


def _run(clf: Classifier, paths: list[Path], batch: int) -> tuple[Outputs, np.ndarray, list[int], list[dict]]:
    """Outputs for the readable images, their OOD scores, their positions in PATHS, and one error per bad file."""
    preds, scores, kept, errors = [], [], [], []
    chunk: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if chunk:
            got = clf.classify(np.stack([x for _, x in chunk]))
            preds.extend(got)
            scores.extend(np.nan if p.ood_score is None else p.ood_score for p in got)
            kept.extend(i for i, _ in chunk)
            chunk.clear()

    for i, p in enumerate(paths):
        try:
            chunk.append((i, clf.preprocess(p)))
        except CadbcnnError as exc:  # one bad file never loses the others
            errors.append({"path": str(p), "error": str(exc)})
        if len(chunk) == batch:
            flush()
    flush()
    out = outputs_of(preds, clf.spec.class_names, clf.spec.ood is not None)
    return out, np.array(scores, np.float64), kept, errors


def verdict(stats: Mapping[str, Any]) -> tuple[str | None, int]:
    """(verdict, index of the rule in ``rule_text()`` that decided it) for one set's statistics."""
    r = RULES
    if stats["n"] < r["min_images"]:
        return None, 0
    silent, review = stats.get("silent_error_rate"), stats["review_rate"]
    ood = stats.get("ood_rate") or 0.0
    site = stats.get("site_flag_rate", ood)  # OOD or appearance: the flags that describe the source lab's images
    if silent is not None and silent > r["stop_silent_error_rate"]:
        return DO_NOT_USE, 1
    if stats.get("accuracy") is not None and stats["accuracy"] < r["min_accuracy"]:
        return FINE_TUNE, 2
    if (review > r["max_review_rate"] and site >= review / 2) or (silent is None and ood > r["max_ood_rate"]) \
            or (stats.get("healthy") and ood > r["max_ood_rate"] and review > r["max_review_rate"]):
        return REFIT, 3
    if review > r["max_review_rate"] or (silent is not None and silent > r["max_silent_error_rate"]):
        return FINE_TUNE, 4
    return USABLE, 5


def validate(model: Path | str | None, folder: Path, out: Path, *, class_map: Mapping[str, str] | None = None,
             healthy: bool = False, batch: int = 32, threads: int | None = None, device: str = "cpu",
             figures: bool = True, precision: str = "auto", backend: str = "onnxruntime") -> dict[str, Any]:
    """Evaluate MODEL on FOLDER and write ``validation.md``, ``validation.json`` (and the PNGs) into OUT."""
    out = Path(out)
    if batch < 1:
        raise ArgumentError("--batch must be >= 1")
    if figures:
        from .evaluation import _pyplot

        _pyplot()  # refuse before any work when matplotlib is missing
    with Classifier.from_file(model, device=device, threads=threads, precision=precision, backend=backend) as clf:
        spec = clf.spec
        folders = (spec.training or {}).get("class_folders") or spec.class_names
        if healthy and BENIGN not in spec.class_names:
            raise ArgumentError(f"--healthy needs a {BENIGN!r} class; the model has {list(spec.class_names)}")
        local = scan(folder, spec.class_names, folders, class_map=class_map, healthy=healthy)
        outputs, scores, kept, errors = _run(clf, local.paths, batch)
        review_threshold, ood_threshold = clf.review_threshold, clf.ood_threshold
        per_class = dict(clf.review_thresholds)
        score_thresholds = None if clf.review_score is None else dict(clf.review_score.thresholds)
        model_info = {"path": str(clf.path), "name": spec.name, "version": spec.version,
                      "precision": clf.precision, "backend": clf.backend, "adaptation": list(spec.adaptation)}
    if not kept:
        raise DatasetError(f"{folder}: none of the {len(local.paths)} images could be read ({errors[0]['error']})")
    truth = None if local.truth is None else local.truth[kept]
    benign = spec.class_names.index(BENIGN) if BENIGN in spec.class_names else 0
    stats = silent_error_stats(outputs.index, truth, outputs.needs_review, healthy=local.healthy,
                               benign_index=benign, out_of_distribution=outputs.ood)
    if outputs.atypical_appearance is not None:  # the appearance check's share of the reviews, for the reader
        stats["appearance_rate"] = float(outputs.atypical_appearance.mean())
        flags = outputs.atypical_appearance | (outputs.ood if outputs.ood is not None else False)
        stats["site_flag_rate"] = float(np.mean(flags))  # what refit-ood refits: the verdict's rule 3
    kind = "labelled" if truth is not None else "healthy" if local.healthy else "unlabelled"
    result: dict[str, Any] = {"folder": str(folder), "kind": kind, "model": model_info, "stats": stats,
                              "review_threshold": review_threshold, "review_thresholds": per_class,
                              "review_score_thresholds": score_thresholds,
                              "ood_threshold": ood_threshold,
                              "unreadable": errors, "class_folders": local.folders, "rules": RULES}
    labels = list(spec.class_names)
    result["predicted"] = {c: int((outputs.index == k).sum()) for k, c in enumerate(labels)}
    result["images"] = [
        {"path": str(local.paths[i]), "truth": None if truth is None else labels[int(truth[j])],
         "label": labels[int(outputs.index[j])], "confidence": float(outputs.confidence[j]),
         "needs_review": bool(outputs.needs_review[j]),
         "out_of_distribution": None if outputs.ood is None else bool(outputs.ood[j]),
         "ood_score": None if not np.isfinite(scores[j]) else float(scores[j]),
         "atypical_appearance": None if outputs.atypical_appearance is None else bool(outputs.atypical_appearance[j])}
        for j, i in enumerate(kept)]
    if truth is not None:
        result["macro_f1"] = macro_f1(truth, outputs.index, len(labels))
        result["per_class"] = {}
        for k, c in enumerate(labels):
            m, p = truth == k, outputs.index == k
            if m.any() or p.any():
                result["per_class"][c] = {
                    "n": int(m.sum()), "recall": float((outputs.index[m] == k).mean()) if m.any() else None,
                    "precision": float((truth[p] == k).mean()) if p.any() else None,
                    "silent_errors": int((m & (outputs.index != k) & ~outputs.needs_review).sum())}
        result["calibration"] = clean_metrics(outputs, truth, review_threshold)
    finite = scores[np.isfinite(scores)]
    if len(finite):
        result["ood_scores"] = {"quantiles": {str(q): float(np.quantile(finite, q)) for q in (0.05, 0.25, 0.5, 0.75,
                                                                                              0.95)},
                                "model_reference": (spec.ood or {}).get("val_quantiles")}
    result["verdict"], rule = verdict({**stats, "healthy": local.healthy})
    result["verdict_rule"] = rule_text()[rule]
    result["verified"] = kind != "unlabelled"
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = []
    if figures:
        title = f"{Path(folder).name}: {spec.name} {spec.version}"
        if truth is not None and len(truth):
            plot_reliability(result["calibration"], out / "reliability.png", title)
            plot_risk_coverage(result["calibration"], review_threshold, out / "risk_coverage.png", title)
            result["figures"] += ["reliability.png", "risk_coverage.png"]
        if len(finite) and ood_threshold is not None:
            plot_ood_scores(finite, ood_threshold, (spec.ood or {}).get("val_quantiles"), out / "ood_scores.png",
                            title)
            result["figures"].append("ood_scores.png")
    (out / "validation.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "validation.md").write_text(report_markdown(result))
    return result


def plot_ood_scores(scores: np.ndarray, threshold: float, reference: Mapping[str, float] | None, path: Path,
                    title: str) -> None:
    """Cumulative distribution of your images' OOD scores against the model's own held-out images (when its spec
    records their quantiles), with the threshold marked."""
    from .evaluation import _pyplot, save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=100)
    s = np.sort(scores)
    ax.step(s, np.arange(1, len(s) + 1) / len(s), where="post", color="tab:blue", label=f"your images (n={len(s)})")
    if reference:
        q = sorted((float(v), float(k)) for k, v in reference.items())
        ax.plot([v for v, _ in q], [k for _, k in q], "o-", color="tab:green", ms=3,
                label="model's held-out images")
    ax.axvline(threshold, color="tab:red", ls="--", label=f"OOD threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set(xlabel="OOD score (log scale)", ylabel="fraction of images ≤ score", ylim=(0, 1.02), title=title)
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _thresholds_text(r: Mapping[str, Any]) -> str:
    """The review threshold, or each predicted class's where the model has one per class."""
    per_class = r.get("review_thresholds") or {}
    if len(set(per_class.values())) > 1:
        return "the threshold of its label (" + describe_thresholds(per_class) + ")"
    return f"{r['review_threshold']:.4g}"


def report_markdown(r: Mapping[str, Any]) -> str:
    s = r["stats"]
    silent = "–" if s["silent_errors"] is None else f"{s['silent_errors']} ({_pct(s['silent_error_rate'])})"
    lines = [f"# Validation of {r['model']['name']} {r['model']['version']} on `{r['folder']}`", "",
             f"**Verdict: {r['verdict'] or 'no verdict'}**" + ("" if r["verified"] else
                                                                " (unverified: no labels; label a sample to confirm)"),
             "", f"Decided by: {r['verdict_rule']}", "",
             f"Model `{r['model']['path']}` ({r['model']['precision']}, {r['model'].get('backend', 'onnxruntime')}); review below confidence "
             + _thresholds_text(r) + ("" if not r.get("review_score_thresholds") else
                                      ", or learned review score below the threshold of its label ("
                                      + describe_thresholds(r["review_score_thresholds"]) + ")")
             + ("" if r["ood_threshold"] is None else
                                               f", out of distribution above OOD score {r['ood_threshold']:.4g}") + ".",
             "", "| set | images | accuracy | review rate | OOD rate | silent errors | accuracy of non-reviewed |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {r['kind']} | {s['n']} | {_pct(s['accuracy'])} | {_pct(s['review_rate'])} | {_pct(s['ood_rate'])} | "
             f"{silent} | {_pct(s['accuracy_non_reviewed'])} |", ""]
    if s.get("appearance_rate") is not None:
        lines += [f"Appearance check: {_pct(s['appearance_rate'])} of the images have colour and contrast unlike the "
                  "training images of the class they were given (reviewed whatever their confidence). Most of a "
                  "set flagged here means this site's stain, camera or exposure differs from the training lab's.", ""]
    if r["kind"] == "healthy":
        lines += [f"Healthy set: any malignant label is an error; malignant labels (reviewed or not): "
                  f"{_pct(s['malignant_rate'])}.", ""]
    if "per_class" in r:
        lines += [f"Macro F1 {100 * r['macro_f1']:.2f} %. Local folders: " +
                  ", ".join(f"`{k}` → {v}" for k, v in r["class_folders"].items()) + ".", "",
                  "| class | images | recall | precision | silent errors |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c} | {v['n']} | {_pct(v['recall'])} | {_pct(v['precision'])} | {v['silent_errors']} |"
                  for c, v in r["per_class"].items()]
        c = r["calibration"]
        lines += ["", f"Calibration: ECE (15 bins) {c['ece']:.4f}, NLL {c['nll']:.4f}, Brier {c['brier']:.4f}.", ""]
    lines += ["Predicted: " + ", ".join(f"{k} {v}" for k, v in r["predicted"].items()) + ".", ""]
    if r.get("ood_scores"):
        q = r["ood_scores"]["quantiles"]
        lines += ["OOD score quantiles (5/25/50/75/95 %): " + ", ".join(f"{v:.3g}" for v in q.values()) + ".", ""]
    if r["unreadable"]:
        lines += [f"{len(r['unreadable'])} file(s) could not be read and are not counted:", ""]
        lines += [f"- `{e['path']}`: {e['error']}" for e in r["unreadable"][:20]] + [""]
    lines += ["## The verdict rule", "", "The first rule that applies decides:", ""]
    lines += [f"{i}. {t}" for i, t in enumerate(rule_text())]
    lines += ["", "Silent error: a wrong label with `needs_review` false (for a healthy set: any malignant label not "
              "sent to review)."]
    for f in r["figures"]:
        lines += ["", f"![{f}]({f})"]
    return "\n".join(lines) + "\n"
