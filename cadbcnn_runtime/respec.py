"""Change an exported model's spec without touching its graph — torch-free.

``replace_spec`` rewrites the ``cadbcnn.spec`` metadata entry of the ONNX bytes (protobuf surgery with the
runtime's own reader; no onnx package) and re-stamps ``content_sha256`` exactly as the exporter does, so the
result loads in the runtime and its graph bytes are identical to the source's. ``calibrate_model`` uses it to
fit a temperature, a review threshold and the field-content check on labelled held-out images and training
images of a model that exists only as ONNX (e.g. the released one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._onnxmeta import _METADATA_PROPS, _fields, _records, content_digest, read_model_bytes
from .atomic import write_atomic
from .calibration import (TARGET_RISK, EachShift, clean_rule_on_kept, fit_calibration, hold_on_shifted,
                          hold_per_class)
from .errors import ArgumentError, DatasetError, ExportError
from .appearance import (SMOOTH_SIGMA, AppearanceCheck, appearance_features, atypical, check_quantile,
                         fit_appearance)
from .quality import content_scores, fit_quality
from .review_score import Scored, fit_review_score
from .spec import METADATA_KEY, ModelSpec



def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(payload)) + payload


def _with_metadata(data: bytes, value: bytes) -> bytes:
    """DATA with its cadbcnn.spec metadata entry's value replaced by VALUE (appended when absent)."""
    buf, out, replaced = memoryview(data), bytearray(), False
    entry = _field(_METADATA_PROPS, _field(1, METADATA_KEY.encode()) + _field(2, value))
    for number, wire, payload, start, end in _records(buf):
        if number == _METADATA_PROPS and wire == 2 and any(
                w == 2 and n == 1 and bytes(v) == METADATA_KEY.encode() for n, w, v in _fields(payload)):
            out += entry
            replaced = True
        else:
            out += buf[start:end]
    if not replaced:
        out += entry
    return bytes(out)


def replace_spec(data: bytes, spec: ModelSpec) -> bytes:
    """The model bytes with SPEC embedded and stamped (graph, weights and every other field unchanged)."""
    spec = spec.without_content_hash()
    stamped = spec.replace(content_sha256=content_digest(data, spec.hashed_json()))
    return _with_metadata(data, stamped.to_json().encode("utf-8"))


def calibrate_model(model: Path, out: Path, *, val: Sequence[tuple[Path, int]], train: Sequence[Path],
                    target_risk: float = TARGET_RISK, shifted: Sequence[tuple[np.ndarray, int]] = (),
                    shifted_target_risk: float = 0.02, per_class: bool = False, shifted_about: str = "",
                    train_labels: Sequence[int] | None = None, appearance_quantile: float | None = None,
                    shift_names: Sequence[str] | None = None, shift_sources: Sequence[int] | None = None,
                    review_score: bool = False, appearance_extra: Sequence[tuple[np.ndarray, int]] = (),
                    appearance_extra_about: str = "", log: Callable[[str], None] = print) -> ModelSpec:
    """Fit temperature + review threshold (VAL: labelled held-out images) and the field-content check (TRAIN
    images) of an ONNX model, and write it to OUT with the new spec. The graph is not touched: a check reruns
    both files on some validation images and requires identical logits.

    SHIFTED (RGB uint8 images of held-out images under synthetic acquisition shifts, labels kept) also holds the
    review rule on them at ``shifted_target_risk``: one threshold for all (``calibration.shifted_review``), or with
    ``per_class`` a threshold per predicted class (``calibration.class_review``). With ``per_class`` both rules,
    the clean one (the floor of every class) and the per-class one, count as kept only the images the runtime
    keeps: images the model flags as out of distribution or blank are reviewed anyway.

    ``appearance_quantile`` also fits the appearance check (``cadbcnn_runtime.appearance``) on the TRAIN images and
    their classes (``train_labels``); with ``per_class`` the images it flags count as flagged too. Without it the
    spec's appearance entry is removed: a check fitted for another review rule is not kept silently.
    ``appearance_extra`` (RGB uint8 images with their classes, described by ``appearance_extra_about``: e.g. stain
    copies of the training images) are fitted on too, beside TRAIN; the field-content check stays TRAIN's alone.

    ``shift_names`` (the shift of each SHIFTED image; needs ``per_class``) holds the per-class rule on every shift's
    images rather than each class's pooled ones (``calibration.each_shift_review``).

    ``review_score`` (needs ``shift_names``, the appearance check and ``shift_sources``: the validation image each
    shifted image was made from) also fits the learned review score (``cadbcnn_runtime.review_score``) on the
    validation images and their shifted copies; the runtime then applies its thresholds instead of the per-class
    confidence thresholds, which stay in the spec for runtimes that do not read the score."""
    from .classifier import Classifier

    if not val or not train:
        raise ArgumentError("calibration needs labelled validation images and training images")
    if Path(out).suffix != ".onnx":
        raise ArgumentError(f"{out}: the output file must end in .onnx")
    if shift_names is not None and (not per_class or len(shift_names) != len(shifted)):
        raise ArgumentError("holding the rule on every shift needs per_class and one shift name per shifted image")
    if review_score and (shift_names is None or appearance_quantile is None or shift_sources is None
                         or len(shift_sources) != len(shifted)):
        raise ArgumentError("the learned review score is fitted with the each-shift rule and the appearance check: "
                            "it needs shift_names, appearance_quantile and the source image of every shifted image")
    if appearance_extra and appearance_quantile is None:
        raise ArgumentError("extra images for the appearance check need the check (appearance_quantile)")
    if appearance_quantile is not None:
        check_quantile(appearance_quantile)
        if train_labels is None or len(train_labels) != len(train):
            raise ArgumentError("the appearance check needs the class of every training image (train_labels)")
    clf = Classifier.from_file(model, device="cpu")

    def inputs(paths: Sequence[Path]):
        for i in range(0, len(paths), 32):
            yield np.stack([clf.preprocess(p) for p in paths[i:i + 32]])

    looks_needed = appearance_quantile is not None
    logits, v_ood, v_content, v_look = _outputs(clf, [p for p, _ in val], looks_needed)  # one pass: the flags need it
    labels = np.array([k for _, k in val])
    entry, review = fit_calibration(logits, labels, target_risk=target_risk,
                                    fitted_on=f"validation split ({len(val)} images)")
    content, looks = [], []
    for x in inputs(list(train)):
        content.append(content_scores(x))
        if looks_needed:
            looks.append(appearance_features(x, SMOOTH_SIGMA))
    quality = fit_quality(np.concatenate(content), fitted_on=f"training split ({len(train)} images)")
    look_labels = list(train_labels or ())
    if appearance_extra:
        for x in inputs([im for im, _ in appearance_extra]):
            looks.append(appearance_features(x, SMOOTH_SIGMA))
        look_labels += [k for _, k in appearance_extra]
    try:
        appearance = None if appearance_quantile is None else fit_appearance(
            np.concatenate(looks), np.asarray(look_labels), clf.spec.class_names, quantile=appearance_quantile,
            smooth_sigma=SMOOTH_SIGMA, fitted_on=f"training split ({len(train)} images){appearance_extra_about}")
    except ValueError as exc:
        raise DatasetError(f"{model}: the appearance check cannot be fitted on this training split ({exc}); add "
                           "training images of that class or leave out --appearance-check") from None
    check = None if appearance is None else AppearanceCheck(appearance, clf.spec.class_names)
    said = ""
    if shifted:
        fitted_on = f"{len(shifted)} shifted validation images{shifted_about}"
        s_logits, s_ood, s_content, s_look = _outputs(clf, [im for im, _ in shifted], looks_needed)
        s_flagged = _flagged(clf, s_ood, s_content, quality["min_content"], check, s_look, s_logits)
        s_labels = np.array([k for _, k in shifted])
        if per_class:
            v_flagged = _flagged(clf, v_ood, v_content, quality["min_content"], check, v_look, logits)
            entry, review = clean_rule_on_kept(entry, logits, labels, v_flagged, target_risk=target_risk)
            each = None if shift_names is None else EachShift(shift_names, logits, v_flagged)
            entry = hold_per_class(entry, review, s_logits, s_labels, s_flagged, class_names=clf.spec.class_names,
                                   fitted_on=fitted_on, target_risk=shifted_target_risk, each_shift=each)
            said = f"; per predicted class on {'every shift of the ' if each else ''}shifted images: " + ", ".join(
                f"{n} {t:.4f}" for n, t in entry["class_review"]["thresholds"].items())
            if each:
                worst = entry["class_review"]["worst_shift"]
                said += f" (worst shift: {worst['shift']}, {100 * worst['silent_error_rate']:.2f} % silent)"
            if review_score:
                entry = {**entry, "review_score": _fit_score(
                    clf.spec.class_names, check, entry, review, (logits, v_ood, v_look), labels, v_flagged,
                    (s_logits, s_ood, s_look), s_labels, s_flagged, shift_names, shift_sources, shifted_target_risk,
                    f"validation split ({len(val)} images) and {fitted_on}")}
                rs = entry["review_score"]
                entry["review_rule"] += ("; the learned review score (calibration.review_score) replaces the "
                                         "per-class confidence thresholds")
                said += ("; learned review score, thresholds " + ", ".join(
                    f"{n} {t:.4f}" for n, t in rs["thresholds"].items())
                    + f" (cross-fitted: worst shift {rs['cross_fit']['worst_shift']['shift']}, "
                    f"{100 * rs['cross_fit']['worst_shift']['silent_error_rate']:.2f} % silent)")
        else:
            entry, review = hold_on_shifted(entry, review, s_logits, s_labels, fitted_on=fitted_on,
                                            target_risk=shifted_target_risk)
            said = f"; held on shifted images: {entry['shifted_review']['threshold']:.4f}"
    spec = clf.spec.replace(calibration=entry, review_threshold=review, quality=quality, appearance=appearance)
    write_atomic(Path(out), replace_spec(read_model_bytes(model), spec))
    with Classifier.from_file(out, device="cpu") as new:
        x = next(inputs([p for p, _ in val[:16]]))
        if not np.array_equal(new.run(x), clf.run(x)) or new.spec != spec.replace(content_sha256=new.spec.content_sha256):
            Path(out).unlink(missing_ok=True)
            raise ExportError(f"{out}: the re-specced model does not reproduce the source's logits; nothing written")
    log(f"temperature {entry['temperature']:.4f} (validation NLL {entry['before']['nll']:.4f} → "
        f"{entry['after']['nll']:.4f}, ECE {entry['before']['ece_15']:.4f} → {entry['after']['ece_15']:.4f}); review "
        f"below {review:.4f}{said}; field-content minimum {quality['min_content']:.2f}"
        + ("" if appearance is None else f"; appearance check at the {100 * appearance_quantile:g}th percentile of "
           "each class's training images") + f" → {out}")
    return spec


def _fit_score(class_names: Sequence[str], check: AppearanceCheck, entry: dict, floor: float, clean: tuple,
               labels: np.ndarray, flagged: np.ndarray, shifted: tuple, s_labels: np.ndarray, s_flagged: np.ndarray,
               shift_names: Sequence[str], shift_sources: Sequence[int], target_risk: float, fitted_on: str) -> dict:
    """``calibration.review_score`` from (logits, OOD scores, appearance features) of the clean validation images
    and of their shifted copies; images under the confidence floor (the clean rule) count as flagged."""
    from .reliability import softmax

    def scored(outs, truth, flags, groups):
        lg, ood, looks = outs
        p = softmax(np.asarray(lg, np.float64), entry["temperature"])
        return Scored(p, ood, check.ratios(looks), truth, flags | (p.max(1) < floor), groups)

    return fit_review_score(scored(clean, labels, flagged, np.arange(len(labels))),
                            scored(shifted, s_labels, s_flagged, np.asarray(shift_sources)), shift_names,
                            class_names=class_names, target_risk=target_risk, fitted_on=fitted_on)


def _outputs(clf, images: Sequence, looks_needed: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(logits, OOD scores or None, field-content scores, appearance features or None unless ``looks_needed``) of
    images (paths or RGB arrays), batches of 32."""
    logits, ood, content, looks = [], [], [], []
    for i in range(0, len(images), 32):
        x = np.stack([clf.preprocess(im) for im in images[i:i + 32]])
        lg, o = clf.run_all(x)
        logits.append(lg)
        ood.append(o)
        content.append(content_scores(x))
        if looks_needed:
            looks.append(appearance_features(x, SMOOTH_SIGMA))
    return (np.concatenate(logits), (None if ood[0] is None else np.concatenate(ood)), np.concatenate(content),
            np.concatenate(looks) if looks_needed else None)


def _flagged(clf, ood: np.ndarray | None, content: np.ndarray, min_content: float,
             check: AppearanceCheck | None = None, looks: np.ndarray | None = None,
             logits: np.ndarray | None = None) -> np.ndarray:
    """The images the runtime reviews whatever their confidence: out of distribution (the spec's OOD threshold), a
    blank field (the new field-content minimum) or, with ``check``, an appearance unlike the training images of the
    predicted class."""
    flagged = content < min_content
    if ood is not None and clf.ood_threshold is not None:
        flagged |= ~(ood <= clf.ood_threshold)
    if check is not None:
        flagged |= atypical(check.scores(looks, np.asarray(logits).argmax(1)))
    return flagged
