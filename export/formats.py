"""The deployable formats, as data (like Ultralytics' export table)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 18
#: INT8 activation-range calibration methods (onnxruntime.quantization's CalibrationMethod names, lower case).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: INT8: the OOD statistics are refitted on the INT8 features of up to this many --calibration-data images (all of
#: them, usually; the activation ranges use --calibration-size of them). Fitted on the 512-image subset only, the
#: released INT8 flag missed one image too many of a foreign set (checkerboards 89 %, gate 90 %); on all 2,059
#: training images it matches FP32 (92 %).
MAX_OOD_FIT_IMAGES = 4096


@dataclass(frozen=True)
class Format:
    key: str              # spec.variant
    suffix: str           # file-name suffix added to -o's stem ("" = the -o path itself)
    description: str
    providers: tuple[str, ...]
    # Parity gate against PyTorch fp32 (random + real images) or against the ORT fp32 model.
    max_abs_logit: float | None   # None: not gated on logits
    min_top1_agreement: float      # on real images (random images when none are given)
    # Derived variants keep the OOD output only if its flag agrees with the FP32 model's on at least this fraction
    # of the real parity images; otherwise the output is removed from that file (classification is unaffected).
    min_ood_flag_agreement: float | None = None
    # With labelled parity images: the most accuracy (percentage points) a derived variant may lose vs FP32.
    max_accuracy_drop_points: float | None = None
    max_class_drop_points: float | None = None


FORMATS: dict[str, Format] = {
    "fp32": Format("fp32", "", "ONNX FP32 — exact reference", ("cpu", "cuda"), 1e-4, 1.0),
    "fp32-fp16weights": Format("fp32-fp16weights", "", "ONNX FP32 compute, weights stored as FP16 (half size)",
                               ("cpu", "cuda"), 5e-2, 1.0),
    "fp16": Format("fp16", ".fp16", "ONNX FP16 for the CUDA EP (fp32 I/O; softmax/LayerNorm/head in fp32)",
                   ("cuda", "cpu"), None, 0.995, 0.97),
    "int8": Format("int8", ".int8", "ONNX INT8 static QDQ for CPUs with VNNI", ("cpu",), None, 0.99, 0.97, 0.3, 1.0),
}
