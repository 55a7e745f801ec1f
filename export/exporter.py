"""Checkpoint → ONNX with the cross-attention intact, the spec embedded and parity gates.

Every artifact is written to a temporary file and renamed into place only
after all of its gates passed.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cadbcnn_runtime._onnxmeta import file_sha256
from cadbcnn_runtime.errors import CadbcnnError, ExportError
from cadbcnn_runtime.machine import git_commit
from cadbcnn_runtime.reliability import softmax
from cadbcnn_runtime.spec import OUTPUT_NAME, ModelSpec
from cadbcnn_train.checkpoint import Checkpoint, load_checkpoint, weights_sha256

from .formats import FORMATS, MAX_OOD_FIT_IMAGES
from .gates import (
    Artifact,
    ExportOptions,
    Gate,
    _atomic_write,
    _check_variant,
    _fail,
    _finish,
    _gate_ood,
    _gate_top1,
    _ood_output_gate,
    conclude,
    gate_accuracy_drop,
    refit_variant_ood,
    variant_path,
)
from .graph import fp16_weight_storage, set_spec, to_fp16, to_int8, torch_to_onnx
from .images import load_image_set
from .parity import compare, ort_outputs, ort_session, torch_outputs


def build_spec(ck: Checkpoint, variant: str, *, with_ood: bool = True) -> ModelSpec:
    sw = dict(ck.spec.software)
    sw.update({"onnx": onnx.__version__, "onnxruntime": ort.__version__, "exporter_torch": str(torch.__version__)})
    return ck.spec.replace(variant=variant, software=sw, git_commit=ck.spec.git_commit or git_commit(),
                           weights_sha256=weights_sha256(ck.state_dict),
                           ood=ck.spec.ood if ck.ood and with_ood else None)


def export_checkpoint(checkpoint: Path, out: Path, opts: ExportOptions | None = None,
                      log=print) -> dict[str, Any]:
    """Export CHECKPOINT to OUT (+ variants); return the report. Raises ExportError on a failed gate."""
    opts = opts or ExportOptions()
    t0 = time.time()
    out = Path(out)
    opts.validate(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    output_names = [OUTPUT_NAME]
    ood_thr = None
    if ck.ood:  # the OOD score travels inside the graph as a second output
        from cadbcnn_train.ood import OUTPUT_NAME as OOD_OUTPUT
        from cadbcnn_train.ood import WithOOD, head_from

        model = WithOOD(model, head_from(ck.ood)).eval()
        output_names.append(OOD_OUTPUT)
        ood_thr = float(ck.spec.ood["threshold"])
    spec = ck.spec
    rng = np.random.default_rng(opts.seed)
    random_cases = {f"random_b{b}": rng.integers(0, 256, (b, 3, *spec.image_size), dtype=np.uint8)
                    for b in (1, 8)}
    real = load_image_set(opts.parity_data, spec, ck.class_folders, limit=opts.parity_limit, seed=opts.seed) \
        if opts.parity_data else None
    ref_random = {k: torch_outputs(model, v) for k, v in random_cases.items()}
    ref_real = torch_outputs(model, real.x) if real is not None else None

    report: dict[str, Any] = {"checkpoint": str(checkpoint), "opset": opts.opset, "artifacts": [],
                              "software": {"torch": str(torch.__version__), "onnx": onnx.__version__,
                                           "onnxruntime": ort.__version__}}

    # -- FP32 (or FP32 with fp16-stored weights) -----------------------------
    base_variant = "fp32-fp16weights" if opts.fp16_weights else "fp32"
    fmt = FORMATS[base_variant]
    proto32 = torch_to_onnx(model, spec.image_size, opts.opset, output_names)
    proto = onnx.ModelProto()
    proto.CopyFrom(proto32)
    if opts.fp16_weights:
        proto = fp16_weight_storage(proto)
    set_spec(proto, build_spec(ck, base_variant))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker ({str(exc)[:300]})") from exc
    base = Artifact(base_variant, out)
    session = ort_session(proto.SerializeToString())
    threshold = opts.max_abs_diff if opts.max_abs_diff is not None else fmt.max_abs_logit
    ood_tol = 1e-4 if base_variant == "fp32" else 5e-2
    for name, x in random_cases.items():
        case = compare(ref_random[name], ort_outputs(session, x), ood_threshold=ood_thr)
        base.parity[name] = case
        base.gates.append(Gate(f"{name} max |Δlogit|", case["max_abs_logit"] <= threshold,
                               case["max_abs_logit"], threshold, "<="))
        if base_variant == "fp32":
            _gate_top1(base, case, fmt.min_top1_agreement, name)
        _gate_ood(base, case, name, ood_tol)
    base_real = None
    if real is not None:
        base_real = ort_outputs(session, real.x)
        case = compare(ref_real, base_real, real.labels if real.labelled else None, ck.class_names, ood_thr)
        base.parity["images"] = case
        base.gates.append(Gate("images max |Δlogit|", case["max_abs_logit"] <= threshold,
                               case["max_abs_logit"], threshold, "<="))
        _gate_top1(base, case, fmt.min_top1_agreement, "images")
        _gate_ood(base, case, "images", ood_tol)
    _gate_runtime_probabilities(base, proto, out, random_cases["random_b8"], ref_random["random_b8"][0], spec,
                                threshold)
    report["artifacts"].append(base)
    if not base.passed:
        failed = "; ".join(g.describe() for g in base.gates if not g.passed)
        _fail(report, [f"parity gate failed for {out} — nothing was written: {failed}"], t0)
    _atomic_write(proto, out)
    base.written, base.size_bytes, base.sha256 = True, out.stat().st_size, file_sha256(out)
    log(f"wrote {out} ({base.size_bytes / 1e6:.1f} MB, {base_variant}, opset {opts.opset})")

    base_random = {k: ort_outputs(session, v) for k, v in random_cases.items()}
    del session
    eval_set = real
    failures = []

    # -- FP16 ------------------------------------------------------------------
    if opts.half:
        fmt = FORMATS["fp16"]
        art = Artifact("fp16", variant_path(out, fmt))
        p16 = to_fp16(proto32)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        art.parity["providers"] = providers[:1]
        try:
            s16 = ort_session(p16.SerializeToString(), providers=providers)
        except Exception as exc:
            raise ExportError(f"the FP16 model could not be loaded by ONNX Runtime ({providers}): {exc}") from exc
        if "CUDAExecutionProvider" not in s16.get_providers():
            log("note: no CUDA EP here — the FP16 model is checked on the CPU EP (slow but valid)")
        _check_variant(art, s16, random_cases, base_random, eval_set, base_real, ck, fmt, ood_thr)
        p16, with_ood = _ood_output_gate(art, p16, fmt, ood_thr, opts, log)
        set_spec(p16, build_spec(ck, "fp16", with_ood=with_ood))
        failures += _finish(art, p16, opts, log)
        report["artifacts"].append(art)

    # -- INT8 ------------------------------------------------------------------
    if opts.int8:
        fmt = FORMATS["int8"]
        art = Artifact("int8", variant_path(out, fmt))
        calib_all = load_image_set(opts.calibration_data, spec, ck.class_folders, limit=MAX_OOD_FIT_IMAGES,
                                   seed=opts.seed)
        calib = calib_all.sample(opts.calibration_size, opts.seed)
        art.parity["calibration_images"] = int(len(calib.x))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "fp32.onnx"
            q = Path(tmp) / "int8.onnx"
            onnx.save_model(proto32, str(src))
            to_int8(src, q, calib.x, method=opts.calibration_method)
            p8 = onnx.load(str(q))
        p8, ood8 = refit_variant_ood(art, p8, calib_all, eval_set, base_real, ood_thr,
                                     lambda x: ort_outputs(ort_session(proto32.SerializeToString()), x)[1], opts,
                                     len(ck.class_names), log)
        s8 = ort_session(p8.SerializeToString())
        _check_variant(art, s8, random_cases, base_random, eval_set, base_real, ck, fmt, ood_thr,
                       ood8 and ood8["threshold"])
        p8, with_ood = _ood_output_gate(art, p8, fmt, ood_thr, opts, log)
        spec8 = build_spec(ck, "int8", with_ood=with_ood)
        set_spec(p8, spec8.replace(ood={**dict(spec8.ood), **ood8}) if spec8.ood and ood8 else spec8)
        gate_accuracy_drop(art, fmt, eval_set)
        failures += _finish(art, p8, opts, log)
        report["artifacts"].append(art)

    return conclude(report, report["artifacts"], failures, t0)


def _gate_runtime_probabilities(art: Artifact, proto: onnx.ModelProto, out: Path, x: np.ndarray,
                                ref_logits: np.ndarray, spec: ModelSpec, tol: float) -> None:
    """Load the file exactly as users will (``cadbcnn_runtime.Classifier``: spec parsing, content hash, I/O check,
    temperature) and compare its probabilities with PyTorch's softmax(logits / T)."""
    from cadbcnn_runtime.calibration import temperature_of
    from cadbcnn_runtime.classifier import Classifier

    tmp = out.with_name(f".{out.name}.{os.getpid()}.runtime-check.onnx")
    try:
        onnx.save_model(proto, str(tmp))
        with Classifier.from_file(tmp, device="cpu") as clf:
            got = np.array([[p.probabilities[c] for c in clf.spec.class_names] for p in clf.classify(x)])
    except CadbcnnError as exc:
        raise ExportError(f"the exported model is refused by cadbcnn_runtime: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    diff = float(np.abs(got - softmax(ref_logits, temperature_of(spec.calibration))).max())
    art.parity["runtime_probabilities"] = {"n": int(len(x)), "temperature": temperature_of(spec.calibration),
                                           "max_abs_prob": diff}
    art.gates.append(Gate("cadbcnn_runtime calibrated probabilities (random_b8) max |Δp|", diff <= tol, diff, tol,
                          "<="))


