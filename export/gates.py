"""The gates of an export, torch-free: what a derived model must reproduce of its reference (ORT FP32 or
PyTorch), the OOD-output rule for derived variants, and writing a model only after its gates passed.
Used by ``exporter`` (from a checkpoint) and ``from_onnx`` (INT8 from an exported model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from cadbcnn_runtime._onnxmeta import file_sha256
from cadbcnn_runtime.atomic import write_atomic
from cadbcnn_runtime.errors import ArgumentError, ExportError
from cadbcnn_runtime.spec import OOD_OUTPUT_NAME

from .formats import CALIBRATION_METHODS, DEFAULT_OPSET, Format
from .graph import drop_output
from .parity import compare, ort_outputs


# ---------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------
@dataclass
class Gate:
    name: str
    passed: bool
    value: float
    threshold: float
    comparison: str  # "<=" or ">="

    def describe(self) -> str:
        return f"{self.name}: {self.value:.6g} (needs {self.comparison} {self.threshold:.6g})"


@dataclass
class Artifact:
    variant: str
    path: Path
    size_bytes: int = 0
    sha256: str = ""
    parity: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    written: bool = False

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "path": str(self.path), "size_bytes": self.size_bytes,
                "sha256": self.sha256, "written": self.written, "passed": self.passed, "parity": self.parity,
                "gates": [g.__dict__ for g in self.gates]}


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    half: bool = False
    int8: bool = False
    fp16_weights: bool = False
    calibration_data: Path | None = None
    calibration_size: int = 256
    calibration_method: str = "minmax"
    parity_data: Path | None = None
    parity_limit: int | None = None
    max_abs_diff: float | None = None     # overrides the fp32 logit gate
    no_gate: bool = False                 # write INT8/FP16 even when their gates fail (loudly)
    seed: int = 0

    def validate(self, out: Path) -> None:
        """Refuse bad arguments before any work (exit 2), never after a model was written."""
        problems = []
        if Path(out).suffix != ".onnx":
            problems.append(f"{out}: the output file must end in .onnx")
        blocker = next((a for a in Path(out).absolute().parents if a.exists()), None)
        if blocker is not None and not blocker.is_dir():
            problems.append(f"{out}: {blocker} is a file, not a folder; choose another -o")
        if self.opset < 17:
            problems.append(f"--opset {self.opset} is too old: LayerNormalization needs opset >= 17")
        if self.int8 and self.calibration_data is None:
            problems.append("--int8 needs --calibration-data DIR (a few hundred representative images)")
        if self.calibration_method not in CALIBRATION_METHODS:
            problems.append(f"--calibration-method {self.calibration_method!r} is not one of "
                            f"{', '.join(CALIBRATION_METHODS)}")
        for flag, folder in (("--calibration-data", self.calibration_data), ("--parity-data", self.parity_data)):
            if folder is not None and not Path(folder).is_dir():
                problems.append(f"{flag} {folder}: folder not found")
        if self.calibration_size < 1 or (self.parity_limit is not None and self.parity_limit < 1):
            problems.append("--calibration-size and --parity-limit must be >= 1")
        if problems:
            raise ArgumentError("; ".join(problems))


def _atomic_write(proto: onnx.ModelProto, dest: Path) -> None:
    """Write a model (its folder made first, as ``--report``'s is: ``validate`` refused a parent that is a file)."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, proto.SerializeToString())


def variant_path(out: Path, fmt: Format) -> Path:
    return out if not fmt.suffix else out.with_name(out.stem + fmt.suffix + out.suffix)

def _gate_top1(art: Artifact, case: dict, threshold: float, label: str) -> None:
    art.gates.append(Gate(f"{label} top-1 agreement", case["top1_agreement"] >= threshold,
                          case["top1_agreement"], threshold, ">="))

def _fail(report: dict[str, Any], failures: list[str], t0: float) -> None:
    report["seconds"] = time.time() - t0
    report["passed"] = False
    report["failures"] = failures
    report["artifacts"] = [a.to_dict() if isinstance(a, Artifact) else a for a in report["artifacts"]]
    raise ExportError("; ".join(failures), report=report)


def _gate_ood(art: Artifact, case: dict, label: str, tol: float) -> None:
    if "ood_max_rel_diff" in case:
        art.gates.append(Gate(f"{label} max relative |Δood_score|", case["ood_max_rel_diff"] <= tol,
                              case["ood_max_rel_diff"], tol, "<="))


def _ood_output_gate(art: Artifact, proto: onnx.ModelProto, fmt: Format, ood_thr: float | None, opts: ExportOptions,
                     log) -> tuple[onnx.ModelProto, bool]:
    """Keep a derived variant's OOD output only if its flag reproduces the FP32 flag on the real parity images.
    Returns the (possibly pruned) graph and whether it still has the OOD output.

    A wrong flag is worse than none (it would mark clean images for review, or pass foreign ones), so when it cannot
    be verified or disagrees, the output is removed from that file and its spec says it has no OOD score; the
    classification gates are separate and unaffected. ``--no-gate`` keeps it regardless (recorded in the report).
    """
    if ood_thr is None or fmt.min_ood_flag_agreement is None:
        return proto, ood_thr is not None
    case = art.parity.get("images", {})
    agree = case.get("ood_flag_agreement")
    verified = agree is not None and agree >= fmt.min_ood_flag_agreement
    kept = verified or opts.no_gate
    art.parity["ood_output"] = {"kept": kept, "flag_agreement": agree, "needs": fmt.min_ood_flag_agreement,
                                "flagged": case.get("ood_flagged")}
    if verified:
        return proto, True
    why = ("no --parity-data to verify it" if agree is None else
           f"its flag agrees with FP32 on {100 * agree:.1f} % of the parity images, needs "
           f">= {100 * fmt.min_ood_flag_agreement:.0f} %")
    if kept:
        log(f"WARNING: {art.variant}: keeping an unverified OOD output because --no-gate was given ({why})")
        return proto, True
    log(f"note: {art.variant}: the OOD output is left out of {art.path.name} ({why}); classification is unaffected. "
        f"Use the FP32 model where the out-of-distribution flag is needed.")
    proto = drop_output(proto, OOD_OUTPUT_NAME)
    onnx.checker.check_model(proto)
    return proto, False


def _check_variant(art: Artifact, session, random_cases, base_random, eval_set, base_real, ck, fmt: Format,
                   ood_thr: float | None = None, got_ood_thr: float | None = None):
    """Compare a derived variant with the ORT FP32 model (random inputs reported, real images gated)."""
    for name, x in random_cases.items():
        art.parity[name] = compare(base_random[name], ort_outputs(session, x), ood_threshold=ood_thr,
                                   got_ood_threshold=got_ood_thr)
    if eval_set is not None:
        case = compare(base_real, ort_outputs(session, eval_set.x),
                       eval_set.labels if eval_set.labelled else None, ck.class_names, ood_thr, got_ood_thr)
        art.parity["images"] = case
        _gate_top1(art, case, fmt.min_top1_agreement, "images vs fp32")
    else:
        art.parity["note"] = "no --parity-data: top-1 agreement gated on random inputs only"
        case = art.parity["random_b8"]
        _gate_top1(art, case, 0.0, "random_b8 vs fp32 (informational)")


def refit_variant_ood(art: Artifact, proto: onnx.ModelProto, calib, eval_set, base_real, ood_thr: float | None,
                      reference: Callable[[np.ndarray], np.ndarray], opts: ExportOptions, num_classes: int, log
                      ) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """INT8: fit the OOD statistics on the quantised model's own features of its calibration images (FP32's
    statistics misjudge them: every image looks foreign), with a threshold that flags as many held-out images as
    FP32 does — the parity images, or a held-out quarter of the calibration images when there are none.
    REFERENCE(x) gives FP32's OOD scores. The refit's own parity (logits untouched, the graph's score equal to
    the numpy reference) is a gate. Returns (the refitted graph, the ``ood`` fields of its spec) or, without an
    OOD output, (PROTO, None)."""
    if ood_thr is None:
        return proto, None
    from .ood_refit import HOLDOUT, refit_variant, split_holdout

    fit = calib
    if eval_set is not None:
        held_x, ref_scores = eval_set.x, base_real[1]
    else:
        fit_idx, held_idx = split_holdout(len(calib.x), HOLDOUT, opts.seed)
        fit, held_x = calib.subset(fit_idx), calib.x[held_idx]
        ref_scores = reference(held_x)
    proto, entry, check = refit_variant(proto, fit, held_x, ref_scores > ood_thr, num_classes=num_classes)
    art.parity["ood_refit"] = {**check, "threshold": entry["threshold"], "fitted_on": entry["fitted_on"],
                               "threshold_rule": entry["threshold_rule"]}
    art.gates.append(Gate("OOD refit: logits untouched, score matches its statistics (max rel diff)",
                          check["passed"], check["ood_max_rel_diff"], check["ood_tolerance"], "<="))
    log(f"{art.variant}: OOD statistics refitted on its own features ({entry['fitted_on']}); threshold "
        f"{entry['threshold']:.4g} ({entry['threshold_rule']})")
    return proto, entry


def _finish(art: Artifact, proto: onnx.ModelProto, opts: ExportOptions, log) -> list[str]:
    if not art.passed and not opts.no_gate:
        failed = "; ".join(g.describe() for g in art.gates if not g.passed)
        log(f"GATE FAILED for {art.variant}: {failed} — {art.path} not written")
        return [f"{art.variant} gate failed: {failed}"]
    if not art.passed:
        log(f"WARNING: {art.variant} failed its gate but --no-gate was given; writing {art.path} anyway")
    _atomic_write(proto, art.path)
    art.written, art.size_bytes, art.sha256 = True, art.path.stat().st_size, file_sha256(art.path)
    log(f"wrote {art.path} ({art.size_bytes / 1e6:.1f} MB, {art.variant})")
    return []


def gate_accuracy_drop(art: Artifact, fmt: Format, eval_set) -> None:
    """With labelled parity images: the format's overall and worst per-class accuracy-drop gates."""
    if eval_set is None or not eval_set.labelled or fmt.max_accuracy_drop_points is None:
        return
    case = art.parity["images"]
    drop = (case["accuracy_ref"] - case["accuracy"]) * 100
    art.gates.append(Gate("images accuracy drop (points)", drop <= fmt.max_accuracy_drop_points, drop,
                          fmt.max_accuracy_drop_points, "<="))
    worst = max((c["accuracy_ref"] - c["accuracy"]) * 100 for c in case["per_class"].values())
    art.gates.append(Gate("worst per-class accuracy drop (points)", worst <= fmt.max_class_drop_points, worst,
                          fmt.max_class_drop_points, "<="))


def conclude(report: dict[str, Any], artifacts: list, failures: list[str], t0: float) -> dict[str, Any]:
    """The export's report: raises the gate error (with the report) when any gate failed."""
    report["artifacts"] = artifacts
    if failures:
        _fail(report, failures, t0)
    report["seconds"] = time.time() - t0
    report["passed"] = True
    report["artifacts"] = [a.to_dict() for a in report["artifacts"]]
    return report
