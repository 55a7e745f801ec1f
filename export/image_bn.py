"""Per-image BatchNorm statistics mixed into the training lab's, inside the graph. The graph code is torch-free
(onnx + onnxruntime + numpy); ``image_bn_model``'s parity gate loads torch for the twin.

Why: a new stain, exposure or camera mostly moves the statistics of every feature map (``adapt_bn`` measures that
per site). One image's own statistics say the same thing, noisily: Schneider et al., "Improving robustness
against common corruptions by covariate shift adaptation" (NeurIPS 2020) mix the source statistics with the test
sample's at a prior weight, which helps even for a single image. Here the trunks' BatchNorms of the chosen stages
normalise with

    μ = (1 − α)·μ_ref + α·μ_img,    σ² = (1 − α)·σ²_ref + α·σ²_img

per image and channel (μ_img, σ²_img over the feature map's pixels), so no batch, site or label is needed and the
file stays one image in, one answer out.

In an exported file each BatchNorm is folded into the convolution before it, so the graph only has the folded
output Y. With m, s² the reference lab's per-channel mean and variance of Y (measured here on REFERENCE images:
``reference_statistics``), the mixed BatchNorm is exactly

    Y' = m + (Y − μ_Y + (1 − α)(μ_Y − m)) / √(1 − α + α·σ²_Y / s²)

(μ_Y, σ²_Y the image's own). ``insert`` adds those few nodes after every trunk convolution of a stage whose α is
above 0. ``cadbcnn_train.image_bn.mixed_image_bn`` is the PyTorch twin the parity gate compares against. The
reference statistics become constants of the graph: the file carries what it needs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cadbcnn_runtime.errors import ArgumentError, ExportError
from cadbcnn_train.image_bn import STAGES, stage_alphas, stage_of

MODELS = ("cadbcnn", "dual_concat", "resnet18", "resnet34", "resnet50")  # ResNet-based: every trunk conv has a BN
DOMAIN_TAG = "image_bn"          # prefix of every node and constant this module adds
VAR_FLOOR = 1e-6                 # s² below this (a dead channel) is raised to it


def trunk_convolutions(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int]]:
    """(convolution, stage) for every convolution of the ResNet trunks (each had a BatchNorm folded into it), in
    graph order; stage 0 = stem … 4 = layer4 (``cadbcnn_train.image_bn.stage_of``). A convolution's weight input
    is named after its module (an FP16-stored weight's Cast output too), as ``adapt_bn.conv_constants`` reads it."""
    out = []
    for n in proto.graph.node:
        if n.op_type == "Conv" and len(n.input) >= 3:
            stage = stage_of(n.input[1].removeprefix("model.").removesuffix(".weight"))
            if stage is not None:
                out.append((n, stage))
    return out


def already_mixed(proto: onnx.ModelProto) -> bool:
    return any(n.name.startswith(DOMAIN_TAG + "/") for n in proto.graph.node)


def reference_statistics(proto: onnx.ModelProto, batches: Iterable[np.ndarray], *, threads: int | None = None
                         ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per-channel (mean, variance) of every trunk convolution's output over the images in BATCHES (preprocessed
    uint8 (N, 3, H, W)), run through PROTO as it is. Returns ({conv output: (m, s²)}, images seen)."""
    from .parity import ort_session

    outs = [n.output[0] for n, _ in trunk_convolutions(proto)]
    if not outs:
        raise ExportError("no trunk convolutions found in the file (not a cadbcnn export?)")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    for t in outs:
        if t not in known:
            probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    session = ort_session(probe.SerializeToString(), threads=threads)
    input_name = session.get_inputs()[0].name
    sums = {t: [0.0, 0.0, 0] for t in outs}
    seen = 0
    for x in batches:
        res = session.run(outs, {input_name: x})
        for t, y in zip(outs, res):
            y = y.astype(np.float64)
            sums[t][0] = sums[t][0] + y.sum(axis=(0, 2, 3))
            sums[t][1] = sums[t][1] + (y * y).sum(axis=(0, 2, 3))
            sums[t][2] += y.shape[0] * y.shape[2] * y.shape[3]
        seen += len(x)
    if not seen:
        raise ExportError("no reference images were given")
    stats = {}
    for t, (s1, s2, n) in sums.items():
        mean = s1 / n
        stats[t] = (mean, np.maximum(s2 / n - mean * mean, 0.0))
    return stats, seen


def _const(proto: onnx.ModelProto, name: str, value: np.ndarray, dtype=np.float32) -> str:
    proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name


def insert(proto: onnx.ModelProto, stats: dict[str, tuple[np.ndarray, np.ndarray]],
           alpha: float | tuple[float, ...]) -> int:
    """Add the mixed BatchNorm after every trunk convolution of PROTO (in place), with the reference statistics
    STATS (``reference_statistics``) and the image's share ALPHA (one number, or one per stage: stem, layer1 …
    layer4; a stage at 0 is left as it is). Returns the number of convolutions changed."""
    try:
        alphas = stage_alphas(alpha)
    except ValueError as exc:
        raise ArgumentError(f"--{exc}") from None
    if already_mixed(proto):
        raise ArgumentError("the file already normalises with per-image statistics; start from the file it was "
                            "made from")
    convs = [(n, alphas[k]) for n, k in trunk_convolutions(proto) if alphas[k] > 0]
    missing = [n.output[0] for n, _ in convs if n.output[0] not in stats]
    if missing:
        raise ExportError(f"no reference statistics for {len(missing)} trunk convolution(s) (e.g. {missing[0]})")
    g = proto.graph
    outputs = [o.name for o in g.output if o.name in {n.output[0] for n, _ in convs}]
    if outputs:
        raise ExportError(f"trunk convolution output {outputs[0]} is a graph output; cannot insert after it")
    if not convs:
        return 0
    axes = _const(proto, f"{DOMAIN_TAG}/axes", [2, 3], np.int64)
    keeps = {a: _const(proto, f"{DOMAIN_TAG}/one_minus_alpha_{k}", np.array(1.0 - a, np.float32))
             for k, a in enumerate(dict.fromkeys(a for _, a in convs))}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}
    for i, (conv, alpha) in enumerate(convs):
        keep = keeps[alpha]
        y = conv.output[0]
        m, s2 = stats[y]
        c = len(m)
        p = f"{DOMAIN_TAG}/{i}"
        mean = _const(proto, f"{p}/ref_mean", m.reshape(1, c, 1, 1))
        gain = _const(proto, f"{p}/alpha_over_ref_var", (alpha / np.maximum(s2, VAR_FLOOR)).reshape(1, c, 1, 1))
        t = lambda s: f"{p}/{s}"  # noqa: E731
        nodes = [
            helper.make_node("ReduceMean", [y, axes], [t("mu")], name=t("mu"), keepdims=1),
            helper.make_node("Sub", [y, t("mu")], [t("d")], name=t("d")),
            helper.make_node("Mul", [t("d"), t("d")], [t("d2")], name=t("d2")),
            helper.make_node("ReduceMean", [t("d2"), axes], [t("var")], name=t("var"), keepdims=1),
            helper.make_node("Mul", [t("var"), gain], [t("var_g")], name=t("var_g")),
            helper.make_node("Add", [t("var_g"), keep], [t("den2")], name=t("den2")),
            helper.make_node("Sqrt", [t("den2")], [t("den")], name=t("den")),
            helper.make_node("Sub", [t("mu"), mean], [t("shift")], name=t("shift")),
            helper.make_node("Mul", [t("shift"), keep], [t("shift_k")], name=t("shift_k")),
            helper.make_node("Add", [t("d"), t("shift_k")], [t("num")], name=t("num")),
            helper.make_node("Div", [t("num"), t("den")], [t("z")], name=t("z")),
            helper.make_node("Add", [t("z"), mean], [t("out")], name=t("out")),
        ]
        new_nodes[y] = nodes
        renamed[y] = t("out")
    # consumers of each conv output now read the mixed one (the new nodes are not in the graph yet); the new nodes go
    # right after their convolution
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in renamed:
                n.input[k] = renamed[name]
    order = []
    for n in g.node:
        order.append(n)
        if n.op_type == "Conv" and n.output[0] in new_nodes:
            order.extend(new_nodes[n.output[0]])
    del g.node[:]
    g.node.extend(order)
    return len(convs)


# -- `cadbcnn-export image-bn`: the whole step on a file --------------------------------------------------------

DEFAULT_ALPHA = (0.2, 0.2, 0.0, 0.0, 0.0)  # stem, layer1 … layer4: chosen on the validation split (docs/SHIFT.md,
                                           # "Per-image BatchNorm statistics in the graph")
PARITY_IMAGES = 8         # reference images, each also checked hue-shifted (where the mixing matters)


def _reference_set(folder, split, spec, *, images: int, seed: int, log):
    """(fit: the reference images of the split's train rows or of FOLDER, labelled by their class folder;
    held: the split's val rows, or None). Unreadable files are skipped and named."""
    from pathlib import Path

    from cadbcnn_runtime.preprocess import preprocess

    from .adapt_bn import decode_images, reference_files
    from .images import ImageSet
    from .ood_refit import class_index

    index = class_index(spec, None)

    def load(files):
        images = decode_images(files, "--reference", log)  # unreadable ones skipped and named
        x = [preprocess(im, spec) for im in images.values()]
        return ImageSet(np.stack(x) if x else np.zeros((0, 3, *spec.image_size), np.uint8),
                        np.array([index.get(Path(f).parent.name, -1) for f in images], np.int64),
                        [str(f) for f in images])

    fit = load(reference_files(folder, split))
    held = None
    if split is not None:
        from cadbcnn_train import data as D

        held = load([Path(folder) / r["path"] for r in D.split_rows(Path(split)) if r["split"] == "val"])
    stats_idx = np.sort(np.random.default_rng(seed).permutation(len(fit.x))[:images])
    return fit, held, stats_idx


def _parity(source, proto: onnx.ModelProto, spec, x_stats: np.ndarray, x_check: np.ndarray,
            alpha: tuple[float, ...]) -> dict:
    """The file against its PyTorch twin: the source's weights, BatchNorms given the same reference images'
    statistics (``rederive_batchnorm``), every trunk BatchNorm mixed (``cadbcnn_train.image_bn``)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from cadbcnn_train.image_bn import mixed_image_bn
    from cadbcnn_train.model import create_model
    from cadbcnn_train.onnx_init import load_onnx_weights, rederive_batchnorm

    from .adapt_bn import file_vs_twin

    model = create_model(spec.name, num_classes=len(spec.class_names))
    load_onnx_weights(model, source)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_stats), torch.zeros(len(x_stats))), batch_size=32)
    rederive_batchnorm(model, loader, torch.device("cpu"), max_images=len(x_stats))
    model.eval()
    with torch.no_grad(), mixed_image_bn(model, alpha):
        ref = model(torch.from_numpy(x_check)).float().numpy()
    return file_vs_twin(proto, x_check, ref)


def image_bn_model(source, out, reference, *, reference_split=None,
                   alpha: float | tuple[float, ...] = DEFAULT_ALPHA,
                   images: int = 512, seed: int = 0, threads: int | None = None, log=print) -> dict:
    """``cadbcnn-export image-bn``: SOURCE with per-image BatchNorm statistics mixed in at ALPHA (``insert``), the
    reference statistics measured on up to IMAGES of REFERENCE (the lab SOURCE was trained on; with
    REFERENCE_SPLIT its train rows), checked against the PyTorch twin, and its OOD statistics refitted on the
    reference's features through the new graph (threshold on the split's val rows, else a held-out quarter).
    Written to OUT only when every check passed. Returns the report."""
    from pathlib import Path

    from cadbcnn_runtime import oodstats
    from cadbcnn_runtime.classifier import Classifier
    from cadbcnn_runtime.errors import DatasetError
    from cadbcnn_train.transforms import hue

    from .adapt_bn import MIN_IMAGES, checked_float_source, rewrite_step
    from .gates import _atomic_write
    from .graph import set_spec
    from .ood_refit import HOLDOUT, refit, split_holdout

    source, out, reference = Path(source), Path(out), Path(reference)
    try:
        alpha = stage_alphas(alpha)
    except ValueError as exc:
        raise ArgumentError(f"--{exc}") from None
    if not any(alpha):
        raise ArgumentError("--alpha: at least one stage above 0, else the file would not change")
    if images < MIN_IMAGES:
        raise ArgumentError(f"--images must be >= {MIN_IMAGES}")
    raw, spec = checked_float_source(source, out, reference, reference_split)
    if spec.name not in MODELS:
        raise ArgumentError(f"{source}: model {spec.name!r}; per-image BatchNorm is built for the ResNet-based models "
                            f"({', '.join(MODELS)})")
    proto = onnx.load_from_string(raw)
    if already_mixed(proto):
        raise ArgumentError(f"{source}: already normalises with per-image statistics; start from the file it was "
                            "made from")

    fit, held, stats_idx = _reference_set(reference, reference_split, spec, images=images, seed=seed, log=log)
    if len(stats_idx) < MIN_IMAGES:
        raise DatasetError(f"--reference {reference}: {len(fit.x)} readable images; give at least {MIN_IMAGES} "
                           f"images of the lab {source.name} was trained on (for the released model: the ALL "
                           "dataset, with --reference-split naming its training split)")
    x_stats = fit.x[stats_idx]
    stats, n_ref = reference_statistics(proto, (x_stats[i:i + 16] for i in range(0, len(x_stats), 16)),
                                        threads=threads)
    mixed = onnx.ModelProto()
    mixed.CopyFrom(proto)
    n_convs = insert(mixed, stats, alpha)
    log(f"{source.name}: reference statistics of {n_ref} images from {reference}; {n_convs} trunk BatchNorms now "
        f"mix in each image's own (alpha {_show(alpha)})")
    probe = fit.x[stats_idx[:PARITY_IMAGES]]
    shifted = np.stack([np.ascontiguousarray(hue(np.ascontiguousarray(im.transpose(1, 2, 0)), 20).transpose(2, 0, 1))
                        for im in probe])
    check = _parity(source, mixed, spec, x_stats, np.concatenate([probe, shifted]), alpha)
    step, report = rewrite_step("image-bn", source, out, reference, reference_split, n_ref, n_convs, check,
                                "the file does not reproduce its PyTorch twin", alpha=dict(zip(STAGES, alpha)))
    log(f"parity with the PyTorch twin on {check['images']} images (half of them hue-shifted): max |Δlogit| "
        f"{check['max_abs_diff']:.2g}, labels agree")
    new_spec = spec.replace(adaptation=(*spec.adaptation, step))
    if spec.ood is not None:
        if held is None or not len(held.x):
            fit_idx, held_idx = split_holdout(len(fit.x), HOLDOUT, seed)
            fit, held = fit.subset(fit_idx), fit.subset(held_idx)
        log(f"refitting the OOD statistics on {len(fit.x)} reference images through the new graph, threshold on "
            f"{len(held.x)} held out …")
        mixed, entry, ood_check = refit(mixed, fit, held, num_classes=len(spec.class_names), threads=threads)
        if not ood_check["passed"]:
            raise ExportError(f"{out}: the OOD refit failed its parity check; nothing written", report=report)
        where = "the split's validation rows" if reference_split is not None else "held-out reference images"
        ood = {**dict(spec.ood), **entry, "fitted_on": f"{len(fit.x)} reference images ({entry['labels']})",
               "threshold_rule": oodstats.threshold_rule(oodstats.FLAG_RATE, len(held.x), where,
                                                         union="rule" in entry)}
        step["ood"] = {"images_fit": len(fit.x), "images_threshold": len(held.x),
                       "threshold": entry["threshold"], "flagged_held_out": entry["val_flagged"]}
        new_spec = spec.replace(ood=ood, adaptation=(*spec.adaptation, step))
        log(f"OOD threshold {entry['threshold']:.4g}: flags {100 * entry['val_flagged']:.1f} % of them")
    expected = _parity_logits(mixed, shifted[:2])
    _atomic_write(set_spec(mixed, new_spec), out)
    with Classifier.from_file(out, device="cpu", precision="fp32", threads=threads) as clf:  # as users load it
        got = clf.run(shifted[:2])
    if not np.allclose(got, expected, atol=1e-4):
        out.unlink(missing_ok=True)
        raise ExportError(f"{out}: the written file does not reproduce the graph it was built from; removed",
                          report=report)
    log(f"wrote {out}. The temperature and review thresholds are still {source.name}'s: refit them on this file "
        "(cadbcnn-train calibrate OUT.onnx …, as the source was) before use")
    report["size_bytes"] = out.stat().st_size
    return report


def parse_alpha(text: str) -> tuple[float, ...]:
    """``--alpha``: "0.1" (every stage) or "0.3,0.3,0.1,0.1,0.1" (stem, layer1 … layer4)."""
    try:
        return stage_alphas([float(v) for v in str(text).split(",")] if "," in str(text) else float(text))
    except ValueError as exc:
        raise ArgumentError(f"--alpha {text!r}: {exc}" if "alpha" in str(exc) else
                            f"--alpha {text!r}: not a number or five comma-separated numbers") from None


def _show(alpha: tuple[float, ...]) -> str:
    return f"{alpha[0]:g}" if len(set(alpha)) == 1 else ", ".join(f"{s} {a:g}" for s, a in zip(STAGES, alpha))


def _parity_logits(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from .parity import ort_session

    sess = ort_session(proto.SerializeToString(), threads=None)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
