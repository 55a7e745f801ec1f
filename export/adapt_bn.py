"""Label-free site adaptation: every BatchNorm's statistics re-measured on a site's own images (AdaBN,
Li et al., "Adaptive Batch Normalization for practical domain adaptation", Pattern Recognition 2018) —
``cadbcnn-export adapt-bn``.

Why: a new stain or microscope moves the statistics of every feature map; the weights still detect the same
patterns. Standardising each channel with the site's own mean and variance, then mapping it to where the training
lab's images put it, undoes much of the shift without a single label (measured on the simulated stain site of
docs/SITE_ADAPTATION.md: 64.9 % → 98 % accuracy from 128 unlabelled images, the same as fine-tuning on 400
labelled ones).

How, on an exported FP32 file (the exporter folded each BatchNorm into the convolution before it):

1. The file's weights go back into the PyTorch model (``cadbcnn_train.onnx_init``). ``rederive_batchnorm`` gives
   the BatchNorm after each folded convolution the statistics of REFERENCE images — the lab the model was trained
   on (for the released model: the public ALL dataset's training split) — keeping the function unchanged.
2. ``recalibrate_bn`` re-measures those statistics on the site's images (train-mode passes, a plain average over
   up to ``images`` of them): the AdaBN step.
3. Each BatchNorm is folded back into its convolution's constants in a copy of the source file (the graph is
   unchanged; FP16-stored weights stay FP16). The written file must give the adapted PyTorch model's labels and
   logits (``PARITY_ATOL``), or nothing is written.
4. The OOD statistics and the appearance check describe the reference lab's features and images, so both are
   refitted on the same site images (``ood_refit.refit_model``, its checks included). The spec's ``adaptation``
   records both steps. The temperature and the review thresholds stay the source's: validate on labelled site
   images (``cadbcnn-infer validate``) before use.

The adapted file is this site's model: on the reference lab's own images it is worse (measured: 99.8 → 80 %).
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from cadbcnn_runtime._onnxmeta import file_sha256
from cadbcnn_runtime.errors import ArgumentError, DatasetError, ExportError
from cadbcnn_runtime.decode import image_files

PARITY_ATOL = 0.05        # max |Δlogit| between the written file and the adapted PyTorch model (FP16-stored weights)
PARITY_IMAGES = 16
MIN_IMAGES = 32           # fewer site images give statistics too noisy to standardise with
VARIANTS = ("fp32", "fp32-fp16weights")


def reference_files(folder: Path, split: Path | None) -> list[Path]:
    """The reference images: every image under FOLDER, or the ``train`` rows of SPLIT (a ``split.csv``)."""
    if split is None:
        return image_files(folder)
    from cadbcnn_train import data as D

    return [Path(folder) / r["path"] for r in D.split_rows(Path(split)) if r["split"] == "train"]


def checked_float_source(source: Path, out: Path, reference: Path, reference_split: Path | None):
    """The refusals every step that rewrites a file's BatchNorms shares, before any work: OUT a new .onnx file,
    REFERENCE a folder, REFERENCE_SPLIT a file, SOURCE a loadable FP32 model. Returns (its bytes, its spec)."""
    from .ood_refit import load_checked

    source, out, reference = Path(source), Path(out), Path(reference)
    if out.suffix != ".onnx":
        raise ArgumentError(f"{out}: the output file must end in .onnx")
    if out.resolve() == source.resolve():
        raise ArgumentError(f"{out}: would overwrite the source model; choose another -o")
    if not reference.is_dir():
        raise ArgumentError(f"--reference {reference}: folder not found")
    if reference_split is not None and not Path(reference_split).is_file():
        raise ArgumentError(f"--reference-split {reference_split}: file not found")
    raw, spec = load_checked(source, str(source))
    if spec.variant not in VARIANTS:
        raise ArgumentError(f"{source}: a {spec.variant} file; start from the FP32 model it was made from (its "
                            "BatchNorms are folded into weights a quantised file no longer holds as floats)")
    return raw, spec


def conv_constants(proto: onnx.ModelProto) -> dict[str, tuple[str, str | None]]:
    """Module name (``branch_a.4.0.conv1``) → the initializers holding its folded weight and bias. A weight stored
    as FP16 behind a Cast is named by the Cast's input."""
    from cadbcnn_train.onnx_init import PREFIX

    inits = {i.name for i in proto.graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Cast" and n.input[0] in inits}
    prefix = PREFIX if any(i.startswith(PREFIX) for i in inits) else ""
    out = {}
    for n in proto.graph.node:
        w = n.input[1] if n.op_type == "Conv" else ""
        if not w.startswith(prefix) or w.startswith("ood.") or "." not in w:
            continue
        b = n.input[2] if len(n.input) > 2 and n.input[2] else None
        out[w[len(prefix):].rsplit(".", 1)[0]] = (cast_of.get(w, w), None if b is None else cast_of.get(b, b))
    return out


def _put(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in proto.graph.initializer if i.name == name)
    dtype = np.float16 if init.data_type == TensorProto.FLOAT16 else np.float32
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype).reshape(tuple(init.dims)), name))


def fold_into(proto: onnx.ModelProto, model) -> int:
    """Write each convolution of MODEL with its BatchNorm folded in (``W·γ/√(σ²+ε)``, ``β − μ·γ/√(σ²+ε)``) into
    the constants of PROTO that the convolution was read from. Returns the number of convolutions written."""
    import torch

    from cadbcnn_train.onnx_init import _conv_bn_pairs

    modules = dict(model.named_modules())
    consts = conv_constants(proto)
    written = 0
    with torch.no_grad():
        for conv, bn_name in _conv_bn_pairs(model).items():
            if conv not in consts or consts[conv][1] is None:
                raise ExportError(f"convolution {conv}: no folded weight and bias in the file to write back")
            bn = modules[bn_name]
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            weight = modules[conv].weight.double() * scale.view(-1, 1, 1, 1)
            bias = bn.bias.double() - bn.running_mean.double() * scale
            _put(proto, consts[conv][0], weight.numpy())
            _put(proto, consts[conv][1], bias.numpy())
            written += 1
    return written


def decode_images(files: list[Path], what: str, log: Callable[[str], None]) -> dict[Path, np.ndarray]:
    """FILES decoded once (RGB), unreadable ones left out and named: one bad file does not stop the run."""
    from cadbcnn_runtime.errors import CadbcnnError
    from cadbcnn_runtime.preprocess import read_image

    out, bad = {}, []
    for f in files:
        try:
            out[f] = read_image(f)
        except (CadbcnnError, OSError) as exc:
            bad.append(f"{f.name} ({exc})")
    if bad:
        log(f"{what}: skipped {len(bad)} unreadable image(s): {'; '.join(bad[:3])}{' …' if len(bad) > 3 else ''}")
    return out


def _batches(images: dict[Path, np.ndarray], spec, batch: int = 32, drop_last: bool = False):
    from torch.utils.data import DataLoader

    from cadbcnn_train import data as D

    return DataLoader(D.ImageDataset([D.Sample(p, 0) for p in images], spec, images=images), batch_size=batch,
                      shuffle=False, drop_last=drop_last)


def adapt_model(source: Path, out: Path, data: Path, reference: Path, *, reference_split: Path | None = None,
                images: int = 512, reference_images: int = 512, class_map: Mapping[str, str] | None = None,
                force: bool = False, seed: int = 0, threads: int | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``cadbcnn-export adapt-bn``: SOURCE's BatchNorm statistics re-measured on the images in DATA (up to IMAGES,
    a seeded random subset), relative to REFERENCE images of the lab it was trained on; then its OOD statistics and
    appearance check refitted on DATA. Written to OUT only when every check passed. Returns the report."""
    import torch

    from cadbcnn_train.model import MODELS, create_model
    from cadbcnn_train.onnx_init import load_onnx_weights, rederive_batchnorm
    from cadbcnn_train.train import recalibrate_bn

    from .graph import set_spec
    from .ood_refit import refit_model

    source, out, data, reference = Path(source), Path(out), Path(data), Path(reference)
    if images < MIN_IMAGES or reference_images < MIN_IMAGES:
        raise ArgumentError(f"--images and --reference-images must be >= {MIN_IMAGES}")
    if not data.is_dir():
        raise ArgumentError(f"--data {data}: folder not found")
    raw, spec = checked_float_source(source, out, reference, reference_split)
    if spec.name not in MODELS:
        raise ArgumentError(f"{source}: model {spec.name!r} is not one cadbcnn-train builds ({', '.join(MODELS)})")
    rng = np.random.default_rng(seed)
    site_files = image_files(data)
    # in random order: each batch's statistics are averaged, so a batch of one class would count its own mean and
    # variance, not the site's (class-sorted folders gave half the variance in a test); partial batches dropped
    site = decode_images([site_files[i] for i in rng.permutation(len(site_files))[:images]], "--data", log)
    if len(site) < MIN_IMAGES:
        raise DatasetError(f"--data {data}: {len(site)} readable images; the site's statistics need at least "
                           f"{MIN_IMAGES} (a few hundred are better)")
    ref_files = reference_files(reference, reference_split)
    ref_files = [ref_files[i] for i in np.sort(rng.permutation(len(ref_files))[:reference_images])]
    ref = decode_images([f for f in ref_files if f.is_file()], "--reference", log)  # exact sums: order is free
    if len(ref) < MIN_IMAGES:
        raise DatasetError(f"--reference {reference}: {len(ref)} readable images of {len(ref_files)} listed; give "
                           f"at least {MIN_IMAGES} images of the lab {source.name} was trained on (for the released "
                           "model: the ALL dataset, with --reference-split naming its training split)")
    if threads:
        torch.set_num_threads(threads)

    torch.manual_seed(seed)
    model = create_model(spec.name, num_classes=len(spec.class_names))
    load_onnx_weights(model, source)
    cpu = torch.device("cpu")
    n_ref = rederive_batchnorm(model, _batches(ref, spec), cpu, max_images=len(ref))
    log(f"{source.name}: BatchNorm statistics of {n_ref} reference images from {reference} (function unchanged)")
    n_site = recalibrate_bn(model, _batches(site, spec, drop_last=True), cpu, max_images=len(site))
    log(f"re-measured on {n_site} site images from {data} (AdaBN)")
    model.eval()

    proto = onnx.load_from_string(raw)
    n_convs = fold_into(proto, model)
    check = _parity(proto, model, {f: site[f] for f in list(site)[:PARITY_IMAGES]}, spec)
    step, report = rewrite_step("adapt-bn", source, out, reference, reference_split, n_ref, n_convs, check,
                                "the adapted file does not reproduce the adapted model", data=str(data),
                                images=n_site)
    log(f"{n_convs} convolutions rewritten; parity on {check['images']} site images: max |Δlogit| "
        f"{check['max_abs_diff']:.2g}, labels agree")
    with tempfile.TemporaryDirectory(prefix="cadbcnn-adapt-") as tmp:
        staged = Path(tmp) / f"{out.stem}.bn-adapted.onnx"
        from .gates import _atomic_write

        _atomic_write(set_spec(proto, spec.replace(adaptation=(*spec.adaptation, step))), staged)
        log("refitting the OOD statistics and the appearance check on the same site images "
            "(the source's describe the reference lab) …")
        report["refit"] = refit_model(staged, out, data, class_map=class_map, force=force, seed=seed,
                                      threads=threads, log=log)
    report["size_bytes"] = out.stat().st_size
    return report


def _parity(proto: onnx.ModelProto, model, images: dict[Path, np.ndarray], spec) -> dict[str, Any]:
    """The written constants against the adapted PyTorch model, on a few site images."""
    import torch

    x = torch.stack([b for b, _ in _batches(images, spec).dataset])
    with torch.no_grad():
        ref = model(x).float().numpy()
    return file_vs_twin(proto, x.numpy(), ref)


def file_vs_twin(proto: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, atol: float = PARITY_ATOL) -> dict[str, Any]:
    """PROTO's logits on X (ORT, the runtime's session options) against a PyTorch twin's REF: the parity record
    (every label equal and max |Δlogit| ≤ ATOL to pass)."""
    from .parity import ort_session

    sess = ort_session(proto.SerializeToString(), threads=None)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    return {"images": len(x), "max_abs_diff": diff, "top1_agreement": agree,
            "passed": bool(diff <= atol and agree == 1.0)}


def rewrite_step(step: str, source: Path, out: Path, reference: Path, reference_split: Path | None, n_ref: int,
                 n_convs: int, check: dict[str, Any], failed: str, **fields) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the spec's ``adaptation`` entry, the report) of a step that rewrote SOURCE's BatchNorms; raises
    ExportError (FAILED says what did not match; nothing written) when the parity CHECK did not pass."""
    when = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    entry = {"step": step, "date": when, **fields, "reference": str(reference),
             "reference_split": None if reference_split is None else str(reference_split),
             "reference_images": n_ref, "convolutions": n_convs, "source": Path(source).name,
             "source_sha256": file_sha256(source), "parity": check}
    report: dict[str, Any] = {"source": str(source), "output": str(out), "adaptation": entry}
    if not check["passed"]:
        raise ExportError(f"{out}: {failed} (labels agree: {check['top1_agreement']:.3f}, max |Δlogit| "
                          f"{check['max_abs_diff']:.3g} > {PARITY_ATOL:g}); nothing written", report=report)
    return entry, report
