"""Latency, throughput, memory and accuracy of every deployable format.

Rows (formats): PyTorch eager FP32 and bf16 autocast, ONNX Runtime FP32 and
INT8 on the CPU EP, FP32 and FP16 on the CUDA EP, the runtime's OpenVINO
backend on the INT8 file, and the peer (OpenVINO on the same files). A format
that cannot run here still gets a row with its status and reason.

Latency is timed with nothing else running in this process; peak memory is
measured afterwards, in a separate untimed pass (``measure``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cadbcnn_runtime.errors import DatasetError
from cadbcnn_runtime.reliability import macro_f1
from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_runtime.variants import variant_key

from .conditions import PeakRSS, conditions, rss_mb
from .runners import (Runner, flops_per_image, openvino_runner, ort_runner, runtime_openvino_runner, time_it,
                      torch_runner)

# the formats that also get an end-to-end row (cadbcnn-infer's pipeline on their own file and backend)
END_TO_END_FORMATS = ("ort-fp32", "ort-int8", "runtime-openvino-int8", "ort-cuda-fp32", "ort-cuda-fp16")
MEM_RUNS = 3  # untimed runs inside the memory sampler, after the timed ones


@dataclass
class Row:
    format: str
    status: str                      # passed | failed | not available
    reason: str = ""
    batch: int | None = None
    threads: int | None = None
    provider: str = ""
    runs: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p50_ms_per_image: float | None = None
    images_per_s: float | None = None
    gflops_per_s: float | None = None
    mem_mb: float | None = None
    size_mb: float | None = None
    vs_torch_fp32: float | None = None   # batch-1 latency ratio (lower is faster)
    vs_ort_fp32: float | None = None
    vs_best_peer: float | None = None    # to the fastest OpenVINO row at the same batch and threads


# ---------------------------------------------------------------------------
# Accuracy, end-to-end, cold start
# ---------------------------------------------------------------------------
def labelled_set(folder: Path, spec: ModelSpec, class_folders, limit: int | None):
    from cadbcnn_export.images import load_image_set

    s = load_image_set(folder, spec, class_folders, limit=limit)
    if not s.labelled:
        raise DatasetError(f"{folder}: --data must hold one sub-folder per class ({', '.join(class_folders)})")
    return s


def accuracy(logits: np.ndarray, labels: np.ndarray, ref: np.ndarray | None, n_classes: int) -> dict[str, float]:
    pred = logits.argmax(1)
    out = {"top1": float((pred == labels).mean()), "f1_macro": macro_f1(labels, pred, n_classes),
           "n": int(len(labels))}
    if ref is not None:
        out["agreement_with_fp32"] = float((pred == ref.argmax(1)).mean())
    return out


def measure(r: Runner, x: np.ndarray, threads: int, min_time: float) -> tuple[list[float], float]:
    """(run times, peak memory MB above the process before the session was built).

    The memory sampler is a Python thread that competes with the runs for the cores (≈ 10 % of the latency on
    2 cores), so the runs are timed without it and the peak is taken in a separate, untimed pass of the same
    runs after them (same input, same shapes: the same allocations).
    """
    base = rss_mb()
    r.set_threads(threads)
    times = time_it(lambda: r.run(x), min_time)
    with PeakRSS(base=base) as mem:
        for _ in range(MEM_RUNS):
            r.run(x)
    return times, mem.delta


E2E_ROUNDS = 3


def end_to_end(model_path: Path, images: Path, batch: int, threads: int, provider: str,
               backend: str = "onnxruntime", rounds: int = E2E_ROUNDS) -> dict[str, Any]:
    """Decode + preprocess + infer a folder through cadbcnn-infer's own pipeline (no output file), against
    model-only throughput of the very same ``Classifier`` session on a preloaded batch.

    The two are interleaved (ROUNDS × [model-only burst over as many images, one pipeline pass]) and the ratio is
    the median of the rounds' ratios: this 2-core machine's speed drifts by ±30 % within minutes, so a ratio of two
    numbers measured at different times measures the drift (one run gave 1.27× "end-to-end over model-only").
    Pinned to MODEL_PATH's own precision: with ``precision="auto"`` an FP32 file with an INT8 file next to it
    runs as INT8 on a VNNI CPU, and its row would compare the INT8 pipeline with the FP32 model-only time.
    """
    from cadbcnn_runtime.classifier import Classifier
    from cadbcnn_runtime.folder import classify_items, discover

    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    clf = Classifier.from_file(model_path, device=device, threads=threads, backend=backend,
                               precision=variant_key(ModelSpec.from_onnx(model_path)))
    if clf.path.resolve() != Path(model_path).resolve():
        raise RuntimeError(f"the runtime chose {clf.path} instead of {model_path}")
    items = discover(images, recursive=True)
    classify_items(clf, items[: batch * 2], batch=batch, on_rows=lambda rows: None)  # warm-up
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, *clf.spec.image_size), dtype=np.uint8)
    runs = max(1, len(items) // batch)
    pipe, model, ratios, s = [], [], [], None
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(runs):
            clf.run_all(x)
        model.append(runs * batch / (time.perf_counter() - t))
        s = classify_items(clf, items, batch=batch, on_rows=lambda rows: None)
        pipe.append(s.images_per_s)
        ratios.append(pipe[-1] / model[-1])
    return {"images": s.ok, "errors": s.errors, "seconds": s.seconds, "images_per_s": float(np.median(pipe)),
            "model_only_interleaved_images_per_s": float(np.median(model)), "ratio": float(np.median(ratios)),
            "round_ratios": [round(r, 3) for r in ratios],
            "file": clf.path.name, "precision": clf.precision, "backend": clf.backend, "providers": clf.providers}


COLD_START = r"""
import time, sys, json
t0 = time.perf_counter()
import numpy as np
from cadbcnn_runtime import Classifier
t1 = time.perf_counter()
c = Classifier.from_file(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
c.predict(np.zeros((224, 224, 3), np.uint8))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "session_s": t2 - t1, "first_result_s": t3 - t2,
                  "torch_loaded": "torch" in sys.modules, "session_cache": c.session_cache}))
"""


def cold_start(model_path: Path, device: str, repeats: int = 3) -> dict[str, Any]:
    """New process → import → session → first result. The first run starts with an empty optimised-graph cache
    (a model's first start on a machine); the median of ``repeats`` later runs is the typical start."""
    with tempfile.TemporaryDirectory(prefix="cadbcnn-cold-") as cache:
        env = {**os.environ, "CADBCNN_CACHE_DIR": cache}
        env.pop("CADBCNN_SESSION_CACHE", None)
        runs = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", COLD_START, str(model_path), device], capture_output=True,
                               text=True, timeout=120, env=env)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
            d = json.loads(r.stdout.strip().splitlines()[-1])
            d["process_total_s"] = wall
            runs.append(d)
    first, later = runs[0], runs[1:]
    out: dict[str, Any] = {k: float(np.median([r[k] for r in later])) for k in later[0]
                           if k not in ("torch_loaded", "session_cache")}
    out["torch_loaded"] = any(r["torch_loaded"] for r in runs)
    out["session_cache"] = later[-1]["session_cache"]
    out["first_start_s"], out["first_session_cache"] = first["process_total_s"], first["session_cache"]
    return out


def end_to_end_rows(runners: dict[str, Runner | str], rows: list[Row], folder: Path, threads: int,
                    log) -> dict[str, dict[str, Any]]:
    """End-to-end vs model-only throughput per runtime format, at the format's best model-only batch.

    A format that cannot run here (not installed, no file, every model-only run failed) or whose end-to-end
    run fails gets an entry with its status and reason, never a crash.
    """
    e2e: dict[str, dict[str, Any]] = {}
    for name, r in runners.items():
        if isinstance(r, str):
            if name in END_TO_END_FORMATS:
                e2e[name] = {"status": "not available", "reason": r}
            continue
        if r.classifier_path is None:
            continue
        passed = [x for x in rows if x.format == name and x.status == "passed" and x.threads == threads]
        if not passed:
            e2e[name] = {"status": "failed", "reason": "no model-only measurement passed at these threads"}
            continue
        best = max(passed, key=lambda x: x.images_per_s)
        try:
            d = end_to_end(r.classifier_path, folder, best.batch, threads, r.provider, r.backend)
        except Exception as exc:  # noqa: BLE001 — a format that fails end-to-end gets a failed entry
            e2e[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        d.update({"status": "passed", "batch": best.batch, "model_only_images_per_s": best.images_per_s})
        e2e[name] = d
        log(f"end-to-end {name} ({d['file']}, {d['precision']}, {d['backend']}): {d['images_per_s']:.1f} img/s vs "
            f"model-only {d['model_only_interleaved_images_per_s']:.1f} interleaved (×{d['ratio']:.2f}, rounds "
            f"{d['round_ratios']}) at batch {best.batch}")
    return e2e


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------
@dataclass
class BenchOptions:
    out: Path
    checkpoint: Path | None = None
    models: list[Path] = field(default_factory=list)
    data: Path | None = None
    images: Path | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    threads: list[int] = field(default_factory=lambda: [1, os.cpu_count() or 1])
    device: str = "cpu"
    min_time: float = 3.0
    data_limit: int | None = None
    image_size: int = 224
    cold_start: bool = True


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def prepare(opts: BenchOptions, work: Path, log) -> tuple[Any, ModelSpec, tuple[str, ...], dict[str, Path]]:
    """The torch model (checkpoint, or random-weight CADBCNN), its spec, and ONNX files per format.

    Files it makes (a random checkpoint, exports) go in ``work``, a scratch folder the caller removes."""
    import onnxruntime as ort
    import torch

    from cadbcnn_train.checkpoint import load_checkpoint

    if opts.checkpoint:
        ck_path = Path(opts.checkpoint)
    else:
        from cadbcnn_train.checkpoint import save_checkpoint
        from cadbcnn_train.model import create_model

        log("no --checkpoint: timing a full-size CADBCNN with random weights (accuracy columns need a trained one)")
        torch.manual_seed(0)
        spec = ModelSpec(name="cadbcnn", version="bench", class_names=("Benign", "Early Pre-B", "Pre-B", "Pro-B"),
                         image_size=(opts.image_size, opts.image_size))
        ck_path = work / "random.pt"
        save_checkpoint(ck_path, model=create_model("cadbcnn", num_classes=4), model_name="cadbcnn",
                        model_kwargs={}, spec=spec, class_folders=("Benign", "Early", "Pre", "Pro"),
                        config={}, split_hash=None, epoch=0)
    ck = load_checkpoint(ck_path)
    files: dict[str, Path] = {}
    for m in opts.models:
        v = ModelSpec.from_onnx(m).variant
        key = {"fp32": "fp32", "fp32-fp16weights": "fp32", "int8": "int8", "fp16": "fp16"}[v]
        files.setdefault(key, Path(m))
    if opts.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        log("--device cuda without onnxruntime's CUDA EP: only PyTorch on the GPU is timed; nothing exported")
        return ck, ck.spec, ck.class_folders, files
    if "fp32" not in files or "int8" not in files:
        from cadbcnn_export.exporter import ExportOptions, export_checkpoint

        calib_dir = opts.images or opts.data
        want_int8 = "int8" not in files
        if want_int8 and calib_dir is None:
            calib_dir = work / "calib"
            rng = np.random.default_rng(0)
            import cv2

            for i in range(32):  # timing only: random calibration images
                (calib_dir / "x").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(calib_dir / "x" / f"{i}.png"),
                            rng.integers(0, 256, (*ck.spec.image_size, 3), dtype=np.uint8))
        log("exporting the missing formats with cadbcnn-export …")
        eo = ExportOptions(int8=want_int8, calibration_data=calib_dir, calibration_size=128,
                           half="fp16" not in files and "CUDAExecutionProvider" in ort.get_available_providers(),
                           no_gate=True)
        export_checkpoint(ck_path, work / "model.onnx", eo, log=log)
        files.setdefault("fp32", work / "model.onnx")
        if want_int8:
            files["int8"] = work / "model.int8.onnx"
        if (work / "model.fp16.onnx").exists():
            files.setdefault("fp16", work / "model.fp16.onnx")
    return ck, ck.spec, ck.class_folders, files


def run_benchmark(opts: BenchOptions, log=print) -> dict[str, Any]:
    for flag, folder in (("--data", opts.data), ("--images", opts.images)):  # before any work
        if folder is not None and not Path(folder).is_dir():
            raise DatasetError(f"{flag} {folder}: folder not found")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # the random checkpoint and exported files (~54 MB) are scratch: removed however the run ends
    with tempfile.TemporaryDirectory(prefix="cadbcnn-bench-") as work:
        return _measure(opts, out, *prepare(opts, Path(work), log), log=log)


def _measure(opts: BenchOptions, out: Path, ck, spec: ModelSpec, class_folders: tuple[str, ...],
             files: dict[str, Path], log) -> dict[str, Any]:
    import onnxruntime as ort

    from cadbcnn_train.env import cpu_has_bf16

    model = ck.build_model()
    flops = flops_per_image(model, spec.image_size)
    ckpt_mb = sum(v.numel() * v.element_size() for v in ck.state_dict.values()) / 1e6
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    gpu = _torch_cuda()
    no_ep = "CUDA EP not available (install onnxruntime-gpu on a CUDA machine)"
    no_gpu = "no CUDA device for PyTorch (torch.cuda.is_available() is False)"

    def onnx(key, make):  # a row on an ONNX file, or why there is none
        return make(files[key]) if key in files else f"no {key.upper()} model"

    # Built only for the device asked for (--device): a runner loads its session or moves a model when built.
    makers: dict[str, Any] = {
        "torch-fp32": lambda: torch_runner(model, "fp32", ckpt_mb),
        "torch-bf16": lambda: torch_runner(model, "bf16", ckpt_mb) if cpu_has_bf16()
        else "CPU lacks AVX512-BF16/AMX: bf16 autocast would be emulated",
        "ort-fp32": lambda: onnx("fp32", lambda f: ort_runner("ort-fp32", f, "CPUExecutionProvider")),
        "ort-int8": lambda: onnx("int8", lambda f: ort_runner("ort-int8", f, "CPUExecutionProvider")),
        # the best peer: OpenVINO on the very same files, default hints and forced FP32
        "openvino-fp32-default": lambda: onnx("fp32", lambda f: openvino_runner("openvino-fp32-default", f)),
        "openvino-fp32-f32": lambda: onnx("fp32", lambda f: openvino_runner("openvino-fp32-f32", f,
                                                                              precision_hint="f32")),
        "openvino-int8": lambda: onnx("int8", lambda f: openvino_runner("openvino-int8", f)),
        # the runtime's own OpenVINO backend (the adapter Classifier(backend="openvino") runs), on the INT8 file
        "runtime-openvino-int8": lambda: onnx("int8", lambda f: runtime_openvino_runner("runtime-openvino-int8", f)),
        "ort-cuda-fp32": lambda: onnx("fp32", lambda f: ort_runner("ort-cuda-fp32", f, "CUDAExecutionProvider"))
        if cuda else no_ep,
        "ort-cuda-fp16": lambda: onnx("fp16", lambda f: ort_runner("ort-cuda-fp16", f, "CUDAExecutionProvider"))
        if cuda else no_ep,
        # PyTorch on the GPU: what a CUDA machine measures without onnxruntime-gpu (docs/STATUS.md, GPU sessions)
        "torch-cuda-fp32": lambda: torch_runner(model, "fp32", ckpt_mb, "cuda") if gpu else no_gpu,
        "torch-cuda-bf16": lambda: torch_runner(model, "bf16", ckpt_mb, "cuda") if gpu else no_gpu,
        "torch-cuda-fp16": lambda: torch_runner(model, "fp16", ckpt_mb, "cuda") if gpu else no_gpu,
    }
    runners: dict[str, Runner | str] = {k: make() for k, make in makers.items()
                                        if opts.device == "all" or ("cuda" in k) == (opts.device == "cuda")}

    rows: list[Row] = []
    providers_used: dict[str, list[str]] = {}
    for name, r in runners.items():
        if isinstance(r, str):
            rows.append(Row(name, "not available", r))
            continue
        thread_list = opts.threads if "cuda" not in name else [opts.threads[-1]]
        for threads in thread_list:
            for b in opts.batches:
                x = np.random.default_rng(b).integers(0, 256, (b, 3, *spec.image_size), dtype=np.uint8)
                try:
                    times, mem_mb = measure(r, x, threads, opts.min_time)
                except Exception as exc:  # noqa: BLE001 — a format that fails gets a failed row
                    rows.append(Row(name, "failed", f"{type(exc).__name__}: {str(exc)[:200]}", b, threads))
                    continue
                if hasattr(r, "session"):
                    providers_used[name] = r.session().get_providers()
                if hasattr(r, "precision"):
                    providers_used[name] = [f"OpenVINO CPU, inference precision {r.precision()}"]
                t = np.array(times) * 1000
                p50 = float(np.percentile(t, 50))
                ips = b / (p50 / 1000)
                rows.append(Row(name, "passed", "", b, threads, r.provider, len(times), p50,
                                float(np.percentile(t, 90)), float(np.percentile(t, 99)), p50 / b, ips,
                                flops * ips / 1e9 if flops else None, mem_mb, r.size_mb))
                log(f"{name:<14} batch {b:<3} threads {threads}: p50 {p50:8.1f} ms  {ips:7.1f} img/s")
    # ratios at the same batch and threads
    def lat(fmt, b, th):
        return next((x.p50_ms for x in rows if x.format == fmt and x.batch == b and x.threads == th
                     and x.status == "passed"), None)
    def best_peer(b, th):
        peers = [x.p50_ms for x in rows if x.format.startswith("openvino") and x.batch == b and x.threads == th
                 and x.status == "passed"]
        return min(peers) if peers else None
    for x in rows:
        if x.status == "passed":
            t_ref, o_ref = lat("torch-fp32", x.batch, x.threads), lat("ort-fp32", x.batch, x.threads)
            p_ref = best_peer(x.batch, x.threads)
            x.vs_torch_fp32 = x.p50_ms / t_ref if t_ref else None
            x.vs_ort_fp32 = x.p50_ms / o_ref if o_ref else None
            x.vs_best_peer = x.p50_ms / p_ref if p_ref else None

    result: dict[str, Any] = {"rows": [asdict(r) for r in rows], "flops_per_image": flops,
                              "model_files": {k: str(v) for k, v in files.items()},
                              "checkpoint": str(opts.checkpoint) if opts.checkpoint else "random weights"}

    # accuracy per format
    if opts.data:
        s = labelled_set(Path(opts.data), spec, class_folders, opts.data_limit)
        acc: dict[str, Any] = {}
        skipped = {}
        for name, r in runners.items():
            if isinstance(r, str):
                continue
            if name.startswith("torch-") and not opts.checkpoint and opts.models:
                # timed on random weights while the ONNX files are trained ones: its accuracy would mislead
                skipped[name] = "random weights (no --checkpoint): timed, accuracy not measured"
                continue
            r.set_threads(opts.threads[-1])
            acc[name] = np.concatenate([r.run(s.x[i:i + 32]) for i in range(0, len(s.x), 32)])
        result["accuracy"] = {k: accuracy(v, s.labels, acc.get("ort-fp32", acc.get("torch-fp32")), spec.num_classes)
                              for k, v in acc.items()}
        if skipped:
            result["accuracy_skipped"] = skipped
        log("accuracy: " + ", ".join(f"{k} {100 * v['top1']:.2f}%" for k, v in result["accuracy"].items()))

    # end-to-end through cadbcnn-infer's pipeline vs model-only at the best batch
    if opts.images or opts.data:
        result["end_to_end"] = end_to_end_rows(runners, rows, Path(opts.images or opts.data), opts.threads[-1], log)

    if opts.cold_start:
        result["cold_start"] = {k: cold_start(files[k], "cpu") for k in ("fp32", "int8") if k in files}
        log("cold start: " + ", ".join(f"{k} {v.get('process_total_s', float('nan')):.2f} s"
                                       for k, v in result["cold_start"].items()))
    result["conditions"] = conditions(opts.threads, providers_used)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    from .report import write_charts, write_report

    write_charts(result, out)
    write_report(result, out)
    return result
