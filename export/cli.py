"""`cadbcnn-export`: checkpoint → ONNX (+ FP16 / INT8) with parity gates."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cadbcnn_runtime.errors import ArgumentError, CadbcnnError
from cadbcnn_runtime.exits import exit_code_of

from .formats import CALIBRATION_METHODS, DEFAULT_OPSET

CalibrationMethod = Enum("CalibrationMethod", {m: m for m in CALIBRATION_METHODS}, type=str)

app = typer.Typer(add_completion=False)


def _summary(report: dict) -> str:
    lines = []
    for a in report["artifacts"]:
        status = "written" if a["written"] else "NOT written"
        lines.append(f"{a['variant']:>17}: {a['path']} — {status}, {a['size_bytes'] / 1e6:.1f} MB")
        for name, case in a["parity"].items():
            if isinstance(case, dict) and "max_abs_logit" in case:
                acc = ""
                if "accuracy" in case:
                    acc = f", accuracy {100 * case['accuracy_ref']:.2f}% → {100 * case['accuracy']:.2f}%"
                lines.append(f"{'':>19}{name:<12} n={case['n']:<4} max|Δlogit| {case['max_abs_logit']:.2e}  "
                             f"mean {case['mean_abs_logit']:.2e}  max|Δprob| {case['max_abs_prob']:.2e}  "
                             f"top-1 agree {100 * case['top1_agreement']:.2f}%{acc}")
        if "ood_output" in a["parity"]:
            o = a["parity"]["ood_output"]
            agree = "not measured" if o["flag_agreement"] is None else f"{100 * o['flag_agreement']:.1f} %"
            lines.append(f"{'':>19}OOD flag agreement vs fp32 {agree} (needs {100 * o['needs']:.0f} %): "
                         f"OOD output {'kept' if o['kept'] else 'LEFT OUT of this file'}")
        for g in a["gates"]:
            mark = "PASS" if g["passed"] else "FAIL"
            lines.append(f"{'':>19}[{mark}] {g['name']}: {g['value']:.4g} ({g['comparison']} {g['threshold']:.4g})")
    return "\n".join(lines)


@app.command()
def main_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="best.pt written by `cadbcnn-train fit`."),
    output: Path = typer.Option(..., "-o", "--output", help="The FP32 model (MODEL.onnx). --half / --int8 add "
                                "MODEL.fp16.onnx / MODEL.int8.onnx next to it. With --from-onnx: the INT8 file."),
    from_onnx: Optional[Path] = typer.Option(None, "--from-onnx", help="Instead of a checkpoint: derive a gated "
                                             "INT8 file from this exported FP32 model (torch-free; needs --int8 "
                                             "and --calibration-data)."),
    opset: int = typer.Option(DEFAULT_OPSET, help="ONNX opset (≥ 17)."),
    half: bool = typer.Option(False, "--half", help="Also write an FP16 model for the CUDA EP (fp32 I/O)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a static INT8 (QDQ) model; needs --calibration-data."),
    fp16_weights: bool = typer.Option(False, "--fp16-weights", help="Store the FP32 model's weights as FP16 "
                                      "(half the file size; compute stays FP32)."),
    calibration_data: Optional[Path] = typer.Option(None, help="Images for INT8 calibration (searched recursively)."),
    calibration_size: int = typer.Option(256, help="How many calibration images set the INT8 activation ranges "
                                         "(its OOD statistics use all of --calibration-data, up to 4096)."),
    calibration_method: CalibrationMethod = typer.Option("minmax", help="INT8 activation-range calibration."),
    parity_data: Optional[Path] = typer.Option(None, help="Real images for the parity gates; class sub-folders "
                                               "(as in training) make it labelled and enable accuracy gates."),
    parity_limit: Optional[int] = typer.Option(None, help="Use at most N parity images."),
    report: Optional[Path] = typer.Option(None, help="Write the full parity report as JSON."),
    max_abs_diff: Optional[float] = typer.Option(None, help="FP32 gate: max |Δlogit| (default 1e-4; 5e-2 with "
                                                 "--fp16-weights)."),
    no_gate: bool = typer.Option(False, "--no-gate", help="Write FP16/INT8 even if their accuracy gate fails, "
                                 "and keep their OOD output even if its flag disagrees with FP32 (loud warning; "
                                 "the FP32 parity gate always applies)."),
) -> None:
    """Export a checkpoint to ONNX with the cross-attention intact and the model spec embedded.

    FP16/INT8 files keep the OOD output only if its flag agrees with FP32's on >= 97 % of
    --parity-data; otherwise the output is left out of that file (said in the log and the report).

    Exit codes: 0 every written model passed every gate; 3 a gate failed (a model
    that failed is not left on disk); 2 bad checkpoint, arguments or data.

    Also: `cadbcnn-export refit-ood MODEL.onnx --data DIR -o LOCAL.onnx` refits the
    OOD flag and the appearance check on your own images (torch-free; see its --help);
    `adapt-bn` adapts the BatchNorm statistics to a site's images; `image-bn` makes the
    file mix each image's own statistics into its first BatchNorms (see their --help).
    """
    import time

    from .gates import ExportOptions

    t0 = time.time()
    opts = ExportOptions(opset=opset, half=half, int8=int8, fp16_weights=fp16_weights,
                         calibration_data=calibration_data, calibration_size=calibration_size,
                         calibration_method=calibration_method.value, parity_data=parity_data, parity_limit=parity_limit,
                         max_abs_diff=max_abs_diff, no_gate=no_gate)
    rep = None
    code = 0
    try:
        if (checkpoint is None) == (from_onnx is None):
            raise ArgumentError("pass a checkpoint (best.pt) or --from-onnx MODEL.onnx, exactly one of them")
        if from_onnx is not None:
            if half or fp16_weights:
                raise ArgumentError("--from-onnx derives the INT8 file only; --half / --fp16-weights need a checkpoint")
            from .from_onnx import int8_from_onnx

            rep = int8_from_onnx(from_onnx, output, opts, log=typer.echo)
        else:
            from .exporter import export_checkpoint

            rep = export_checkpoint(checkpoint, output, opts, log=typer.echo)
    except CadbcnnError as exc:  # the report (if any) is rendered below, then the exit code of cadbcnn_runtime.exits
        rep = getattr(exc, "report", None)
        typer.echo(f"error: {exc}", err=True)
        code = exit_code_of(exc)
    if rep is not None:
        import onnx

        if output.is_file() and any(a["written"] for a in rep["artifacts"]):
            m = onnx.load(str(output), load_external_data=False)
            io = lambda vs: ", ".join(f"{v.name}[{'x'.join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)}]" for v in vs)  # noqa: E731
            typer.echo(f"opset {opset}; inputs {io(m.graph.input)}; outputs {io(m.graph.output)}")
        typer.echo(_summary(rep))
        typer.echo(f"done in {time.time() - t0:.1f} s — {'all gates passed' if rep.get('passed') else 'FAILED'}")
        if report:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    raise typer.Exit(code)


SUBCOMMANDS = {"refit-ood": "refit_cli", "adapt-bn": "adapt_cli", "image-bn": "image_bn_cli"}  # `cadbcnn-export refit-ood …`; else: the export


def main(argv: list[str] | None = None) -> None:
    import importlib
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        sub = importlib.import_module(f"{__package__}.{SUBCOMMANDS[argv[0]]}")
        sub.app(args=argv[1:], prog_name=f"cadbcnn-export {argv[0]}")
    else:
        app(args=argv, prog_name="cadbcnn-export")


if __name__ == "__main__":
    main()
