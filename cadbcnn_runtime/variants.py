"""Which file of a released model to run: FP32, INT8 or FP16, picked for this machine unless the user names one.

A model ``X.onnx`` may have variants next to it, written by ``cadbcnn-export``: ``X.int8.onnx`` (static INT8,
fast on CPUs with VNNI dot-product instructions) and ``X.fp16.onnx`` (for the CUDA execution provider).

``precision="auto"`` (the default of ``Classifier.from_file`` and ``cadbcnn-infer``):

* CUDA is used and ``X.fp16.onnx`` exists → FP16;
* else the CPU has AVX512-VNNI or AVX-VNNI and ``X.int8.onnx`` exists → INT8;
* else FP32 (``X.onnx``).

``"fp32"``, ``"int8"``, ``"fp16"`` ask for that file (an error naming the file and how to make it when it is
missing). A file named directly (``--model X.int8.onnx``) is used as it is. A variant is used only if its spec
describes the same model as ``X.onnx`` — name, version, classes, image size and input — and never silently
otherwise. The choice and the reason are kept as ``Classifier.precision`` / ``Classifier.precision_reason``
and printed by ``cadbcnn-infer``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArgumentError, ModelSpecError
from .machine import CpuInfo, cpu_info
from .spec import ModelSpec

PRECISIONS = ("auto", "fp32", "int8", "fp16")
SUFFIXES = {"int8": ".int8.onnx", "fp16": ".fp16.onnx"}
_FP32_VARIANTS = ("fp32", "fp32-fp16weights")


def variant_key(spec: ModelSpec) -> str:
    """fp32 | int8 | fp16 — what a file computes in (FP32 with FP16-stored weights computes in FP32)."""
    return "fp32" if spec.variant in _FP32_VARIANTS else spec.variant


def sibling(base: Path, key: str) -> Path:
    """The path of variant KEY of the model BASE (``X.onnx`` → ``X.int8.onnx``)."""
    if key == "fp32":
        return base
    return base.with_name(base.name[: -len(".onnx")] + SUFFIXES[key] if base.name.endswith(".onnx")
                          else base.name + SUFFIXES[key])


def choose(base: Path, precision: str, *, cuda: bool, cpu: CpuInfo | None = None) -> tuple[str, Path, str]:
    """(variant key, file, reason) for the model BASE; raises ArgumentError for a named variant that is missing."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        path = sibling(base, precision)
        if not path.is_file():
            raise ArgumentError(f"{path}: no {precision.upper()} file next to {base.name}; make one with "
                                f"`cadbcnn-export CHECKPOINT -o {base.name} --{'int8 --calibration-data DIR' if precision == 'int8' else 'half'}`"
                                " or use --precision auto")
        return precision, path, "asked for"
    cpu = cpu or cpu_info()
    fp16, int8 = sibling(base, "fp16"), sibling(base, "int8")
    if cuda and fp16.is_file():
        return "fp16", fp16, "CUDA is used and an FP16 file is there"
    if cpu.has_vnni and int8.is_file():
        return "int8", int8, f"this CPU has VNNI ({cpu.isa}) and an INT8 file is there"
    if int8.is_file():
        return "fp32", base, f"this CPU has no VNNI ({cpu.isa}): INT8 gains less here; --precision int8 to use it"
    return "fp32", base, "the only file of this model" if not fp16.is_file() else "FP16 is for CUDA"


def check_same_model(base: ModelSpec, other: ModelSpec, path: Path) -> None:
    """Refuse a variant whose spec describes another model than the FP32 file's."""
    diffs = [f"{k}: {getattr(other, k)!r} ≠ {getattr(base, k)!r}"
             for k in ("name", "version", "class_names", "image_size", "input_name", "input_dtype")
             if getattr(other, k) != getattr(base, k)]
    if diffs:
        raise ModelSpecError(f"{path}: is not a variant of the same model ({'; '.join(diffs)}); it will not be "
                             "used in its place. Re-export the variants together with cadbcnn-export, or remove it.")
