"""Refit an exported model's OOD statistics on other images — torch-free (onnx + onnxruntime + numpy).

The OOD head in the graph (``cadbcnn_train.ood.OODHead``) has one part per feature it reads — the fused pooled
feature vector and, for models trained from v0.2.0 on, the pooled statistics of early ResNet stages — and two
constants per part: the whitening matrix Σ^-1/2 and the whitened means (the part's scale folded in). This module

- finds every part in any exported file, FP32, FP16-stored or INT8 (``locate``); the fused feature tensor's
  name is recorded in the spec (``ood.feature_tensor``) and ``with_feature_output`` exposes every part's
  features as extra outputs, so any ONNX Runtime session can read them;
- fits new statistics on the model's own features of a set of images (``cadbcnn_runtime.oodstats``), writes
  them into the constants (same dtype as stored; the graph is otherwise untouched), and picks the scales and
  threshold on held-out images by the flag-rate (union) rule (``refit``);
- checks the result: logits identical to the source's, and the graph's OOD output equal to the numpy
  reference computed from the stored statistics (``parity``).

``refit_model`` is ``cadbcnn-export refit-ood`` (a lab adapts the flag to its own microscope); the INT8
export uses ``refit`` to fit the statistics on the quantised model's own features.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cadbcnn_runtime import oodstats
from cadbcnn_runtime._onnxmeta import file_sha256, metadata_of, read_model_bytes
from cadbcnn_runtime.errors import (
    ArgumentError,
    CadbcnnError,
    DatasetError,
    ExportError,
)
from cadbcnn_runtime.spec import INPUT_NAME, OOD_OUTPUT_NAME, ModelSpec

from .images import ImageSet, load_image_set
from .parity import ort_session

HOLDOUT = 0.25            # share of the local images kept out of the fit to set the threshold
OOD_PARITY_TOL = 1e-4     # max relative |graph OOD score − numpy reference|


@dataclass(frozen=True)
class OODPart:
    """One part of the OOD head: the feature tensor it reads and its two constants (initializers, possibly
    FP16-stored behind a Cast)."""

    name: str            # oodstats.FUSED or a stage ("a_layer1", …)
    feature: str
    whitening: str
    means: str


@dataclass(frozen=True)
class OODGraph:
    """Where the OOD head lives in a graph: its parts, the fused one first."""

    parts: tuple[OODPart, ...]

    @property
    def fused(self) -> OODPart:
        return self.parts[0]

    @property
    def feature(self) -> str:
        """The fused features' tensor (what the spec records as ``ood.feature_tensor``)."""
        return self.fused.feature

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


#: The whitening constant of a part: ``ood.whitening`` (the fused part) or ``ood.stages.<name>.whitening``, as
#: ``cadbcnn_train.ood.OODHead`` names its buffers (a suffix such as an FP16 storage name may follow).
_WHITENING = re.compile(r"^ood\.(?:stages\.(\w+?)\.)?whitening")


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in proto.graph.node for o in n.output}


def _const_source(proto: onnx.ModelProto, tensor: str) -> str | None:
    """The initializer holding TENSOR's value: TENSOR itself or the input of the Cast that produces it."""
    inits = {i.name for i in proto.graph.initializer}
    if tensor in inits:
        return tensor
    node = _producers(proto).get(tensor)
    if node is not None and node.op_type == "Cast" and node.input[0] in inits:
        return node.input[0]
    return None


def _means_after(proto: onnx.ModelProto, start: str) -> str | None:
    """The class-means constant of the Sub that follows the whitening MatMul's output START."""
    g = proto.graph
    frontier, seen = {start}, set()
    while frontier:
        nxt = set()
        for m in g.node:
            if m.name in seen or not frontier.intersection(m.input):
                continue
            seen.add(m.name)
            if m.op_type == "Sub":
                other = next(i for i in m.input if i not in frontier)
                return _const_source(proto, other)
            nxt.update(m.output)
        frontier = nxt
    return None


def locate(proto: onnx.ModelProto) -> OODGraph:
    """The OOD head of PROTO: per part, a MatMul reads (features, Σ^-1/2); a Sub then takes the whitened class means."""
    g = proto.graph
    if OOD_OUTPUT_NAME not in {o.name for o in g.output}:
        raise ArgumentError(f"the model has no {OOD_OUTPUT_NAME!r} output: it was exported without an OOD head "
                            "(fit one with `cadbcnn-train fit-ood` and export again)")
    found: dict[str, OODPart] = {}
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        srcs = [_const_source(proto, i) for i in n.input]
        hit = _WHITENING.match(srcs[1] or "")
        if hit is None or srcs[0] is not None:
            continue
        name = hit.group(1) or oodstats.FUSED
        means = _means_after(proto, n.output[0])
        if means is not None and name not in found:
            found[name] = OODPart(name, n.input[0], srcs[1], means)
    if oodstats.FUSED not in found:
        raise ExportError("could not find the OOD head (MatMul with ood.whitening, then Sub with the class means) in "
                          "the graph; was it exported by cadbcnn-export?")
    return OODGraph((found.pop(oodstats.FUSED), *found.values()))


def _init(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in proto.graph.initializer if i.name == name)


def stored_parts(proto: onnx.ModelProto, where: OODGraph | None = None) -> dict[str, oodstats.OODStatistics]:
    """Every part's statistics as stored in the graph (scales folded in), in float64."""
    where = where or locate(proto)
    out = {}
    for p in where.parts:
        w = numpy_helper.to_array(_init(proto, p.whitening)).astype(np.float64)
        m = numpy_helper.to_array(_init(proto, p.means)).astype(np.float64).reshape(-1, w.shape[0])
        out[p.name] = oodstats.OODStatistics(w, m, tuple(range(len(m))), 0.0)
    return out


def stored_statistics(proto: onnx.ModelProto, where: OODGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(whitening (D, D), whitened means (K, D)) of the fused part as stored in the graph, in float64."""
    st = stored_parts(proto, where)[oodstats.FUSED]
    return st.whitening, st.means_w


def with_feature_output(proto: onnx.ModelProto, where: OODGraph | None = None) -> onnx.ModelProto:
    """A copy of PROTO with every OOD part's feature tensor as an extra output (after the existing ones)."""
    where = where or locate(proto)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in dict.fromkeys(p.feature for p in where.parts):
        out.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return out


def run_with_features(proto: onnx.ModelProto, x: np.ndarray, *, batch: int = 32, threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(logits, ood_score, {part: features}) of the preprocessed images X through PROTO (the runtime's session
    options)."""
    where = locate(proto)
    session = ort_session(with_feature_output(proto, where).SerializeToString(), threads=threads)
    tensors = list(dict.fromkeys(p.feature for p in where.parts))
    names = [session.get_outputs()[0].name, OOD_OUTPUT_NAME, *tensors]
    outs = [session.run(names, {INPUT_NAME: x[i:i + batch]}) for i in range(0, len(x), batch)]
    cols = [np.concatenate([o[k] for o in outs]) for k in range(len(names))]
    by_tensor = dict(zip(tensors, cols[2:]))
    return cols[0], cols[1], {p.name: by_tensor[p.feature] for p in where.parts}


def install(proto: onnx.ModelProto, parts: dict[str, oodstats.OODStatistics], where: OODGraph | None = None
            ) -> onnx.ModelProto:
    """Write every part's statistics (PARTS: name → statistics, scales folded in) into PROTO's OOD constants (in
    place, each in its stored dtype and layout)."""
    where = where or locate(proto)
    if set(parts) != set(where.names):
        raise ExportError(f"statistics for parts {sorted(parts)} do not match the graph's OOD parts {where.names}")
    consts = set()
    for p in where.parts:
        st = parts[p.name]
        for name, value in ((p.whitening, st.whitening), (p.means, st.means_w)):
            init = _init(proto, name)
            old = numpy_helper.to_array(init)
            shape = old.shape if value.size == old.size else (*old.shape[:-2], *value.shape)
            init.CopyFrom(numpy_helper.from_array(value.reshape(shape).astype(old.dtype), name))
        consts.add(p.whitening)
    # A different number of class means changes the head's intermediate shapes: let ORT infer them again.
    head = set()
    for n in proto.graph.node:
        if head.intersection(n.input) or consts.intersection(n.input) or n.output[0] in consts:
            head.update(n.output)
    kept = [v for v in proto.graph.value_info if v.name not in head]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto


def parity(source_logits: np.ndarray, logits: np.ndarray, ood: np.ndarray, features: dict[str, np.ndarray],
           proto: onnx.ModelProto) -> dict[str, Any]:
    """The refit's parity: identical logits, and the graph's OOD output vs the numpy score of the stored statistics."""
    ref = oodstats.combined_scores(stored_parts(proto), features)
    rel = np.abs(ood.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref))
    return {"n": int(len(ood)), "logits_identical": bool(np.array_equal(source_logits, logits)),
            "ood_max_rel_diff": float(rel.max()), "ood_tolerance": OOD_PARITY_TOL,
            "passed": bool(np.array_equal(source_logits, logits) and rel.max() <= OOD_PARITY_TOL)}


def split_holdout(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of N images: a seeded random HOLDOUT share is kept out of the fit."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * holdout))
    return np.sort(order[k:]), np.sort(order[:k])


def labels_or_predictions(images: ImageSet, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each image's class: its class folder, else the model's prediction from LOGITS; which had a folder)."""
    known = images.labels >= 0 if len(images.labels) else np.zeros(len(images.x), bool)
    return np.where(known, images.labels if len(images.labels) else -1, logits.argmax(1)), known


def _fit(fit: ImageSet, logits: np.ndarray, feats: dict[str, np.ndarray], *, num_classes: int,
         shrinkage: float | str) -> tuple[dict[str, oodstats.OODStatistics], str]:
    """Every part's statistics fitted on the features FEATS of FIT: class labels where the images have them, the
    model's own predictions (LOGITS) elsewhere. Returns (raw statistics, how the labels were chosen)."""
    if len(fit.x) < 2 * num_classes:
        raise DatasetError(f"{len(fit.x)} images are too few to fit class means and a covariance")
    labels, known = labels_or_predictions(fit, logits)
    raw = oodstats.fit_parts(feats, labels, num_classes, shrinkage=shrinkage)
    n = int(known.sum())
    how = ("class folders" if n == len(fit.x) else "the model's own predictions" if n == 0 else
           f"class folders ({n}) and the model's own predictions ({len(fit.x) - n})")
    return raw, how


def _install_scaled(proto: onnx.ModelProto, raw: dict[str, oodstats.OODStatistics], held: dict[str, np.ndarray], *,
                    flagged: int, strict: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of PROTO with RAW's statistics, each part scaled by the union rule on the held-out features HELD
    (``oodstats.part_scales``). Returns (copy, the spec's new ``ood`` fields but the flag rate)."""
    scales, threshold, rule = oodstats.part_scales({k: st.scores(held[k]) for k, st in raw.items()},
                                                   flagged=flagged, strict=strict)
    new = onnx.ModelProto()
    new.CopyFrom(proto)
    install(new, {k: oodstats.scaled(st, scales[k]) for k, st in raw.items()})
    fused = raw[oodstats.FUSED]
    entry = {"threshold": threshold, "method": oodstats.METHOD_MULTI if len(raw) > 1 else oodstats.METHOD,
             "shrinkage": fused.shrinkage, "classes_fitted": [int(k) for k in fused.classes]}
    if len(raw) > 1:
        entry.update(parts=oodstats.describe_parts(raw, scales), rule=rule)
    return new, entry


def refit(proto: onnx.ModelProto, fit: ImageSet, held: ImageSet, *, num_classes: int,
          flag_rate: float = oodstats.FLAG_RATE, shrinkage: float | str = "auto", threads: int | None = None,
          fit_pass: tuple[np.ndarray, dict] | None = None, held_pass: tuple[np.ndarray, dict] | None = None
          ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any]]:
    """New OOD statistics for PROTO fitted on its own features of FIT, and scales/threshold flagging FLAG_RATE of
    HELD (held-out images of the same kind; the stages alone at most ``oodstats.STRICT_RATE``). ``fit_pass`` and
    ``held_pass`` (PROTO's logits and part features of FIT and HELD) skip re-running PROTO when the caller has
    them. Returns (a refitted copy, the spec's new ``ood`` fields, the parity check on HELD)."""
    min_held = int(np.ceil(1 / flag_rate))
    if len(held.x) < min_held:
        raise DatasetError(f"{len(held.x)} held-out images cannot set a threshold that flags {100 * flag_rate:g} % "
                           f"of them: need at least {min_held} (give more images or a larger --flag-rate)")
    where = locate(proto)
    fit_logits, fit_feats = fit_pass or run_with_features(proto, fit.x, threads=threads)[::2]
    src_logits, held_feats = held_pass or run_with_features(proto, held.x, threads=threads)[::2]
    raw, how = _fit(fit, fit_logits, fit_feats, num_classes=num_classes, shrinkage=shrinkage)
    flagged, strict = oodstats.flag_counts(len(held.x), flag_rate)
    new, entry = _install_scaled(proto, raw, held_feats, flagged=flagged, strict=strict)
    logits, scores, feats = run_with_features(new, held.x, threads=threads)
    entry.update(feature_tensor=where.feature, labels=how, flag_rate=flag_rate,
                 val_flagged=float((scores > entry["threshold"]).mean()))
    return new, entry, parity(src_logits, logits, scores, feats, new)


def refit_variant(proto: onnx.ModelProto, fit: ImageSet, held_x: np.ndarray, reference_flags: np.ndarray, *,
                  num_classes: int, threads: int | None = None
                  ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any]]:
    """A derived variant (INT8) with OOD statistics fitted on its own features of FIT (its calibration images),
    and scales/threshold that flag as many of HELD_X as the FP32 model does (REFERENCE_FLAGS): the variant's
    features differ from FP32's, so FP32's statistics would misjudge them. Returns (copy, ood fields, parity)."""
    where = locate(proto)
    fit_logits, _, fit_feats = run_with_features(proto, fit.x, threads=threads)
    src_logits, _, held_feats = run_with_features(proto, held_x, threads=threads)
    raw, how = _fit(fit, fit_logits, fit_feats, num_classes=num_classes, shrinkage="auto")
    n = len(held_x)
    k = min(int(np.sum(reference_flags)), n - 1)
    new, entry = _install_scaled(proto, raw, held_feats, flagged=k,
                                 strict=min(k, oodstats.flag_counts(n)[1]))
    logits, scores, feats = run_with_features(new, held_x, threads=threads)
    entry.update(feature_tensor=where.feature, labels=how, val_flagged=float((scores > entry["threshold"]).mean()),
                 fitted_on=f"the variant's own features of {len(fit.x)} calibration images ({how})",
                 threshold_rule=f"flags as many of {n} held-out images as the FP32 model ({100 * k / n:.2f} %)")
    return new, entry, parity(src_logits, logits, scores, feats, new)


class LookRefit:
    """The appearance check (``cadbcnn_runtime.appearance``) of SPEC refitted on a site's images, beside the OOD
    refit and on the same fit / held-out images: class means and covariances from the fit images (their class
    folders, else the model's predictions), cuts set on the held-out ones (``refit_appearance``). Built before any
    fitting, so too few images of a class are refused up front; with ``refit=False`` (``--keep-appearance``) it
    only measures how often the source's check flags the site's held-out images."""

    def __init__(self, spec: ModelSpec, images: ImageSet, logits: np.ndarray, fit_idx: np.ndarray,
                 held_idx: np.ndarray, data: Path, source: Path, *, refit: bool):
        from cadbcnn_runtime.appearance import MIN_PER_CLASS, AppearanceCheck

        self.spec, self.data, self.refit = spec, data, refit
        self.fit_idx, self.held_idx = fit_idx, held_idx
        self.check = AppearanceCheck(spec.appearance, spec.class_names)
        self.predicted = logits.argmax(1)
        self.labels, _ = labels_or_predictions(images, logits)
        counts = np.bincount(self.labels[fit_idx], minlength=len(spec.class_names))
        short = [f"{n} {int(c)}" for n, c in zip(spec.class_names, counts) if c < MIN_PER_CLASS]
        if refit and short:
            raise DatasetError(
                f"{data}: refitting the appearance check needs at least {MIN_PER_CLASS} images of each class among "
                f"the {len(fit_idx)} fitted ({len(held_idx)} more are held out for the threshold); it has "
                f"{', '.join(short)} (by class folder, else by the model's prediction). Add images of that class, "
                f"or pass --keep-appearance to keep {source.name}'s check (fitted on the source lab's images: it may "
                "flag more of yours)")
        self.features = self.check.features(images.x)

    def run(self, how: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the spec's new ``appearance`` entry, the adaptation step's ``appearance`` record); HOW names the labels
        used, as the OOD refit's."""
        from cadbcnn_runtime.appearance import atypical, refit_appearance

        held = self.held_idx
        before = float(atypical(self.check.scores(self.features[held], self.predicted[held])).mean())
        if not self.refit:
            return dict(self.spec.appearance), {"refitted": False, "source_flagged_held_out": before}
        fit = self.fit_idx
        entry = refit_appearance(self.spec.appearance, self.features[fit], self.labels[fit], self.features[held],
                                 self.predicted[held], self.spec.class_names,
                                 fitted_on=f"{len(fit)} local images from {self.data.name} ({how})")
        return entry, {"refitted": True, "source_flagged_held_out": before,
                       "flagged_held_out": entry["held_out"]["flagged"],
                       "cut_factor": entry["held_out"]["cut_factor"]}


def class_index(spec: ModelSpec, class_map: Mapping[str, str] | None) -> dict[str, int]:
    """Local folder name → class index: the spec's class folders and class names, plus CLASS_MAP (folder → class),
    by the same rule as ``cadbcnn-infer validate`` (``validate.local_class_names``)."""
    from cadbcnn_runtime.validate import local_class_names

    folders = (spec.training or {}).get("class_folders") or spec.class_names
    names = local_class_names(spec.class_names, folders, class_map)
    return {local: spec.class_names.index(ours) for local, ours in names.items()}


def check_classifier_first(source: Path, images: ImageSet, logits: np.ndarray, *, force: bool,
                           log: Callable[[str], None]) -> float | None:
    """With labelled local images: refuse (unless FORCE) to refit the flag of a model that misclassifies them.

    A refitted flag stops flagging the site's images — including the ones the classifier gets wrong, which
    then pass as confident, unreviewed calls. Measured on the simulated site (docs/SITE_ADAPTATION.md):
    silent errors 6.1 % → 29.0 % after a refit on a model that was 65 % accurate there. The bar is the
    validate rule's (``validate.RULES["min_accuracy"]``). LOGITS: the source model's on IMAGES. Returns the
    accuracy (None when unlabelled)."""
    from cadbcnn_runtime.validate import FINE_TUNE, RULES

    if not images.labelled:
        log("note: the images are unlabelled, so the classifier's accuracy here is unknown; a refitted flag stops "
            "flagging these images whether or not they are classified right — validate on labelled images first")
        return None
    acc = float((logits.argmax(1) == images.labels).mean())
    if acc < RULES["min_accuracy"]:
        msg = (f"{source.name} classifies only {100 * acc:.1f} % of these labelled images correctly (the bar is "
               f"{100 * RULES['min_accuracy']:g} %): a refitted OOD flag would let its errors through as confident, "
               f"unreviewed calls. {FINE_TUNE.capitalize()} (`cadbcnn-train fit --init {source}`), or pass --force")
        if not force:
            raise ExportError(msg, report={"source": str(source), "accuracy": acc, "refused": True})
        log(f"WARNING (--force): {msg}")
    return acc


def load_checked(source: Path, what: str) -> tuple[bytes, ModelSpec]:
    """SOURCE's bytes and spec, after the runtime's own load checks (spec, content hash, I/O); a model the runtime
    would refuse is a bad argument (WHAT names it in the message)."""
    from cadbcnn_runtime.classifier import Classifier

    try:
        with Classifier.from_file(source, device="cpu", precision="fp32"):
            pass
    except CadbcnnError as exc:
        raise ArgumentError(f"{what}: {exc}") from None
    raw = read_model_bytes(source)
    return raw, ModelSpec.from_metadata(metadata_of(raw, source), source=str(source))


def refit_model(source: Path, out: Path, data: Path, *, class_map: Mapping[str, str] | None = None,
                flag_rate: float = oodstats.FLAG_RATE, holdout: float = HOLDOUT, shrinkage: float | str = "auto",
                limit: int | None = None, seed: int = 0, threads: int | None = None, force: bool = False,
                appearance: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``cadbcnn-export refit-ood``: SOURCE's OOD statistics refitted on the in-distribution images in DATA
    (class sub-folders optional), written to OUT with the spec's ``ood`` entry and ``adaptation`` provenance
    updated; the graph is otherwise unchanged. With APPEARANCE (the default) the spec's appearance check, when it
    has one, is refitted on the same images and held-out share (``LookRefit``): it too describes what the source
    lab's images look like. Written only after the parity check passed. Returns the report."""
    from cadbcnn_runtime.classifier import Classifier

    source, out, data = Path(source), Path(out), Path(data)
    if out.suffix != ".onnx":
        raise ArgumentError(f"{out}: the output file must end in .onnx")
    if out.resolve() == source.resolve():
        raise ArgumentError(f"{out}: would overwrite the source model; choose another -o")
    if not 0 < flag_rate < 0.5 or not 0 < holdout < 1:
        raise ArgumentError("--flag-rate must be in (0, 0.5) and --holdout in (0, 1)")
    if not data.is_dir():
        raise ArgumentError(f"--data {data}: folder not found")
    raw, spec = load_checked(source, str(source))
    if spec.ood is None:
        raise ArgumentError(f"{source}: the model has no OOD output to refit")
    index = class_index(spec, class_map)
    images = load_image_set(data, spec, index, limit=limit, seed=seed)
    proto = onnx.load_from_string(raw)
    src_logits, src_scores, src_feats = run_with_features(proto, images.x, threads=threads)  # the source, once
    check_classifier_first(source, images, src_logits, force=force, log=log)
    fit_idx, held_idx = split_holdout(len(images.x), holdout, seed)
    fit, held = images.subset(fit_idx), images.subset(held_idx)
    look = None if spec.appearance is None else LookRefit(spec, images, src_logits, fit_idx, held_idx, data,
                                                           source, refit=appearance)  # refuses before any fit
    log(f"{source.name}: refitting the OOD statistics on {len(fit.x)} images of {data}, threshold on "
        f"{len(held.x)} held out …")
    new, entry, check = refit(proto, fit, held, num_classes=len(spec.class_names), flag_rate=flag_rate,
                              shrinkage=shrinkage, threads=threads,
                              fit_pass=(src_logits[fit_idx], {k: v[fit_idx] for k, v in src_feats.items()}),
                              held_pass=(src_logits[held_idx], {k: v[held_idx] for k, v in src_feats.items()}))
    old_thr = float(spec.ood["threshold"])
    when = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    ood = {**dict(spec.ood), **entry,
           "fitted_on": f"{len(fit.x)} local images from {data.name} ({entry['labels']})",
           "threshold_rule": oodstats.threshold_rule(flag_rate, len(held.x), f"held-out local images from {data.name}",
                                                     union="rule" in entry)}
    step = {"step": "refit-ood", "date": when, "data": str(data), "images_fit": len(fit.x),
            "images_threshold": len(held.x), "labels": entry["labels"], "source": source.name,
            "source_sha256": file_sha256(source), "source_threshold": old_thr,
            "source_flagged_held_out": float((src_scores[held_idx] > old_thr).mean()),
            "flagged_held_out": entry["val_flagged"]}
    look_entry = spec.appearance
    if look is not None:
        look_entry, step["appearance"] = look.run(entry["labels"])
    new_spec = spec.replace(ood=ood, appearance=look_entry, adaptation=(*spec.adaptation, step))
    report = {"source": str(source), "output": str(out), "torch_free": True, "parity": check, "adaptation": step,
              "ood": {k: ood[k] for k in ("threshold", "flag_rate", "shrinkage", "fitted_on", "threshold_rule")}}
    if not check["passed"]:
        raise ExportError(f"{out}: the refitted model failed its parity check (logits identical: "
                          f"{check['logits_identical']}, OOD max rel diff {check['ood_max_rel_diff']:.2e} > "
                          f"{OOD_PARITY_TOL:g}); nothing written", report=report)
    from .gates import _atomic_write
    from .graph import set_spec

    _atomic_write(set_spec(new, new_spec), out)
    with Classifier.from_file(out, device="cpu", precision="fp32") as clf:  # loads as users will
        got = clf.run_all(held.x[:8])
    if not np.array_equal(got[0], src_logits[held_idx[:8]]):
        out.unlink(missing_ok=True)
        raise ExportError(f"{out}: the written model does not reproduce the source's logits; removed", report=report)
    log(f"held-out local images flagged: {100 * step['source_flagged_held_out']:.1f} % with the source's statistics "
        f"→ {100 * entry['val_flagged']:.1f} % refitted (threshold {old_thr:.4g} → {entry['threshold']:.4g}); "
        f"parity: logits identical, OOD max rel diff {check['ood_max_rel_diff']:.1e} → {out}")
    if look is not None:
        a = step["appearance"]
        log(f"held-out local images unlike the training images' colour and contrast (appearance check): "
            f"{100 * a['source_flagged_held_out']:.1f} % with the source's check"
            + (f" → {100 * a['flagged_held_out']:.1f} % refitted" if a["refitted"] else
               " (kept: --keep-appearance)"))
    report["size_bytes"] = out.stat().st_size
    return report

