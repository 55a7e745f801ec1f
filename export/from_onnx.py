"""INT8 from an exported model, torch-free: ``cadbcnn-export --from-onnx models/cadbcnn.onnx --int8 …``.

A lab that holds only the released ONNX file and its own images builds and gates its own INT8 file. The
reference is ONNX Runtime FP32 on the source file itself (the checkpoint is not needed):

1. the source is loaded and verified as the runtime loads it (spec, content hash); it must be an FP32 model;
2. FP16-stored weights are turned back into FP32 initializers (lossless) so the quantiser sees constants;
3. static INT8 (QDQ, U8S8, per-channel) calibrated on ``--calibration-data`` — the layers the OOD score reads
   and the attention products stay in float, exactly as ``cadbcnn-export`` does from a checkpoint; the OOD
   statistics are then refitted on the INT8 model's own features (``gates.refit_variant_ood``);
4. the INT8 format's gates against the source (thresholds in ``formats.FORMATS["int8"]``): top-1 agreement on
   the ``--parity-data`` images, and with labelled images (class sub-folders named as in the spec's
   ``training.class_folders``) ≤ 0.3 points accuracy loss overall and ≤ 1 point per class; the OOD output is
   kept only if its flag agrees with FP32's on ≥ 97 % of the images, otherwise left out (and said);
5. the file gets the source's spec with ``variant: int8`` (calibration, review threshold and classes unchanged;
   the ``ood`` entry carries the INT8 statistics' threshold and how they were fitted),
   stamped, written only after every gate passed (exit 3 and nothing written otherwise).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.variants import variant_key

from .formats import FORMATS, MAX_OOD_FIT_IMAGES
from .gates import (
    Artifact,
    ExportOptions,
    _check_variant,
    _finish,
    _ood_output_gate,
    conclude,
    gate_accuracy_drop,
    refit_variant_ood,
)
from .graph import set_spec, to_int8, unfold_fp16_weights
from .images import load_image_set
from .ood_refit import load_checked
from .parity import ort_outputs, ort_session


def int8_from_onnx(source: Path, out: Path, opts: ExportOptions, log=print) -> dict[str, Any]:
    """Write a gated INT8 variant of the FP32 model SOURCE at OUT; returns the report (raises GateError on a
    failed gate, with the report attached, and writes nothing)."""
    t0 = time.time()
    source, out = Path(source), Path(out)
    opts.validate(out)
    if not opts.int8:
        raise ArgumentError("--from-onnx derives an INT8 model: pass --int8 and --calibration-data DIR")
    if out.resolve() == source.resolve():
        raise ArgumentError(f"{out}: would overwrite the source model; choose another -o (e.g. X.int8.onnx)")
    data, spec = load_checked(source, f"--from-onnx {source}")
    if variant_key(spec) != "fp32":
        raise ArgumentError(f"--from-onnx {source}: is a {spec.variant} model; derive INT8 from the FP32 one")
    class_folders = tuple((spec.training or {}).get("class_folders") or spec.class_names)
    ood_thr = float(spec.ood["threshold"]) if spec.ood else None
    fmt = FORMATS["int8"]
    art = Artifact("int8", out)
    report: dict[str, Any] = {"source": str(source), "torch_free": True, "artifacts": [],
                              "software": {"onnx": onnx.__version__, "onnxruntime": ort.__version__}}

    proto32 = unfold_fp16_weights(onnx.load_from_string(data))
    calib_all = load_image_set(opts.calibration_data, spec, class_folders, limit=MAX_OOD_FIT_IMAGES, seed=opts.seed)
    calib = calib_all.sample(opts.calibration_size, opts.seed)
    art.parity["calibration_images"] = int(len(calib.x))
    log(f"{source.name}: INT8 calibration on {len(calib.x)} images ({opts.calibration_method}) …")
    with tempfile.TemporaryDirectory() as tmp:
        src, q = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto32, str(src))
        to_int8(src, q, calib.x, method=opts.calibration_method)
        p8 = onnx.load(str(q))
    s32 = ort_session(proto32.SerializeToString())
    rng = np.random.default_rng(opts.seed)
    random_cases = {f"random_b{b}": rng.integers(0, 256, (b, 3, *spec.image_size), dtype=np.uint8) for b in (1, 8)}
    base_random = {k: ort_outputs(s32, v) for k, v in random_cases.items()}
    eval_set = load_image_set(opts.parity_data, spec, class_folders, limit=opts.parity_limit, seed=opts.seed) \
        if opts.parity_data else None
    base_real = ort_outputs(s32, eval_set.x) if eval_set is not None else None
    p8, ood8 = refit_variant_ood(art, p8, calib_all, eval_set, base_real, ood_thr, lambda x: ort_outputs(s32, x)[1],
                                 opts, len(spec.class_names), log)
    s8 = ort_session(p8.SerializeToString())
    _check_variant(art, s8, random_cases, base_random, eval_set, base_real,
                   SimpleNamespace(class_names=spec.class_names), fmt, ood_thr, ood8 and ood8["threshold"])
    p8, with_ood = _ood_output_gate(art, p8, fmt, ood_thr, opts, log)
    gate_accuracy_drop(art, fmt, eval_set)
    software = {**dict(spec.software), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "int8_from_onnx": source.name}
    ood = {**dict(spec.ood), **ood8} if with_ood and ood8 else None
    set_spec(p8, spec.replace(variant="int8", ood=ood, software=software))
    failures = _finish(art, p8, opts, log)
    return conclude(report, [art], failures, t0)
