"""Smoke test of cadbcnn-bench: report structure only — never speeds."""

import json
import math
import shutil
import tempfile

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_bench.cli import app
from conftest import make_dataset, save_random_checkpoint


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_smoke_report_structure(tmp_path, monkeypatch):
    ck = save_random_checkpoint(tmp_path / "ck.pt", model="resnet18", image_size=32)
    data = make_dataset(tmp_path / "data", per_class=3, size=32)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = CliRunner().invoke(app, ["--out", str(tmp_path / "b"), "--checkpoint", str(ck), "--data", str(data),
                                 "--batch", "1,2", "--threads", "1", "--min-time", "0.05", "--no-cold-start"])
    assert r.exit_code == 0, r.output
    # the exported files are scratch: nothing left in the temp folder (each run used to leave ~54 MB there)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("cadbcnn-bench-")]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = res["rows"]
    formats = {x["format"] for x in rows}
    assert {"torch-fp32", "torch-bf16", "ort-fp32", "ort-int8"} <= formats
    for x in rows:
        assert x["status"] in ("passed", "failed", "not available")
        if x["status"] == "passed":
            assert x["p50_ms"] > 0 and x["images_per_s"] > 0 and x["p99_ms"] >= x["p50_ms"] and x["runs"] >= 3
            assert isinstance(x["mem_mb"], float) and math.isfinite(x["mem_mb"])  # from the untimed pass
        else:
            assert x["reason"]
    for f in ("ort-fp32", "ort-int8", "torch-fp32"):
        assert {x["batch"] for x in rows if x["format"] == f and x["status"] == "passed"} == {1, 2}
    assert next(x for x in rows if x["format"] == "ort-fp32" and x["batch"] == 1)["vs_ort_fp32"] == 1.0
    assert set(res["accuracy"]) >= {"torch-fp32", "ort-fp32", "ort-int8"}
    assert 0 <= res["accuracy"]["ort-int8"]["top1"] <= 1
    report = (tmp_path / "b" / "report.md").read_text()
    e2e = res["end_to_end"]
    assert e2e["ort-fp32"]["images"] == 12
    # each end-to-end row runs its own file (the FP32 row is not the INT8 file next to it, whatever the CPU)
    assert (e2e["ort-fp32"]["file"], e2e["ort-fp32"]["precision"]) == ("model.onnx", "fp32")
    assert (e2e["ort-int8"]["file"], e2e["ort-int8"]["precision"]) == ("model.int8.onnx", "int8")
    assert "model.onnx (fp32, onnxruntime)" in report
    cond = res["conditions"]
    assert cond["cores"] >= 1 and "onnxruntime" in cond["versions"] and "avx512f" in cond["isa"]
    assert "| ort-int8 | passed |" in report and "Accuracy per format" in report
    # the best peer, OpenVINO on the same files: measured and compared, or a row that says it is not installed
    peers = [x for x in rows if x["format"].startswith("openvino")]
    assert {x["format"] for x in peers} == {"openvino-fp32-default", "openvino-fp32-f32", "openvino-int8"}
    ours = [x for x in rows if x["format"] == "runtime-openvino-int8"]  # the runtime's backend: not a peer
    assert ours and "| runtime-openvino-int8 |" in report
    from cadbcnn_runtime.machine import cpu_info

    if not _openvino_installed():
        assert all(x["status"] == "not available" and "not installed" in x["reason"] for x in peers + ours)
        assert e2e["runtime-openvino-int8"]["status"] == "not available"
    else:
        ov_rows = [x for x in peers if x["status"] == "passed"]  # peers run on every CPU
        assert {x["batch"] for x in ov_rows} == {1, 2}
        assert min(x["vs_best_peer"] for x in ov_rows) == 1.0
        assert next(x for x in rows if x["format"] == "ort-fp32" and x["batch"] == 1)["vs_best_peer"] > 0
        assert abs(res["accuracy"]["openvino-fp32-f32"]["agreement_with_fp32"] - 1.0) < 1e-9
        d = e2e["runtime-openvino-int8"]
        if not cpu_info().has_vnni:  # the runtime refuses OpenVINO INT8 there, and its rows say so
            assert all(x["status"] == "not available" and "refused by the runtime" in x["reason"]
                       and "VNNI" in x["reason"] for x in ours)
            assert d["status"] == "not available" and "VNNI" in d["reason"]
        else:
            assert {x["batch"] for x in ours if x["status"] == "passed"} == {1, 2}
            assert res["conditions"]["providers_used"]["runtime-openvino-int8"] == ["OpenVINO CPU (f32)"]
            assert (d["status"], d["file"], d["precision"], d["backend"], d["images"]) == \
                   ("passed", "model.int8.onnx", "int8", "openvino", 12)
            assert d["model_only_images_per_s"] == max(x["images_per_s"] for x in ours if x["status"] == "passed")
            assert "runtime-openvino-int8" in res["accuracy"]
    assert "Fastest format per batch size" in report and "×best peer" in report
    assert (tmp_path / "b" / "latency.png").is_file() and (tmp_path / "b" / "throughput.png").is_file()


def test_cold_start_reports_the_first_start_and_the_cached_starts(onnx_model):
    from cadbcnn_bench.bench import cold_start

    r = cold_start(onnx_model, "cpu", repeats=1)
    assert "error" not in r, r
    assert r["first_session_cache"] == "miss" and r["session_cache"] == "hit"
    assert r["first_start_s"] > 0 and r["process_total_s"] > 0 and not r["torch_loaded"]


def test_torch_rows_on_random_weights_get_no_accuracy_beside_trained_onnx_files(onnx_model, tmp_path):
    """No --checkpoint but trained --model files: the PyTorch rows time a random-weight CADBCNN, so their accuracy
    (≈ chance) is left out and the report says why, instead of a misleading number."""
    from cadbcnn_bench.bench import BenchOptions, run_benchmark
    from cadbcnn_runtime import ModelSpec

    size = ModelSpec.from_onnx(onnx_model).image_size[0]
    data = make_dataset(tmp_path / "data", per_class=2, size=size)
    opts = BenchOptions(out=tmp_path / "b", models=[onnx_model], data=data, batches=[1], threads=[1],
                        min_time=0.02, image_size=size, cold_start=False)
    res = run_benchmark(opts, log=lambda *a: None)
    assert "torch-fp32" not in res["accuracy"] and "ort-fp32" in res["accuracy"]
    assert "random weights" in res["accuracy_skipped"]["torch-fp32"]
    assert "| torch-fp32 | — | — | — | — (random weights" in (tmp_path / "b" / "report.md").read_text()


def test_runs_are_timed_outside_the_memory_sampler(monkeypatch):
    """The sampler thread costs ≈ 10 % of the latency on 2 cores: no timed run may happen while it samples, and
    the untimed pass after the timing still sees the memory the runs take."""
    from cadbcnn_bench import bench
    from cadbcnn_bench.runners import Runner

    sampling: list[bool] = []

    class Recording(bench.PeakRSS):
        def __enter__(self):
            sampling.append(True)
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            sampling.pop()

    timed_while_sampling, runs_while_sampling, kept = [], [], []
    real_time_it = bench.time_it

    def time_it(fn, min_time, **kw):
        timed_while_sampling.append(bool(sampling))
        return real_time_it(fn, min_time, **kw)

    def run(x):
        runs_while_sampling.append(bool(sampling))
        # 40 MiB touched and kept: resident memory the runs take. Above glibc's largest mmap threshold (32 MiB),
        # so each is a fresh mapping: a 32 MiB array could reuse heap memory freed (still resident) by an
        # earlier test and add nothing to the RSS (seen once in the full suite: 160 of 192 MiB)
        kept.append(np.ones(5 * 2**20))
        return x

    monkeypatch.setattr(bench, "PeakRSS", Recording)
    monkeypatch.setattr(bench, "time_it", time_it)
    times, mem = bench.measure(Runner("fake", run, lambda t: None, "fake"), np.zeros(1), 1, 0.01)
    assert timed_while_sampling == [False] and len(times) >= 3
    assert runs_while_sampling.count(True) == bench.MEM_RUNS and not any(runs_while_sampling[:-bench.MEM_RUNS])
    assert mem >= 40 * (len(times) + bench.MEM_RUNS)


def test_end_to_end_runs_the_file_it_is_compared_with(onnx_model, tmp_path, monkeypatch):
    """With precision "auto" an FP32 file with an INT8 file beside it runs as INT8 on a VNNI CPU; each end-to-end
    row is pinned to its own file, precision and backend."""
    from cadbcnn_bench.bench import end_to_end
    from cadbcnn_runtime import Classifier, ModelSpec, machine, variants
    from cadbcnn_runtime.machine import CpuInfo
    from cadbcnn_runtime.respec import replace_spec

    base = tmp_path / "m.onnx"
    shutil.copy(onnx_model, base)
    int8 = base.with_name("m.int8.onnx")  # the same graph, its spec saying int8: selection only
    int8.write_bytes(replace_spec(base.read_bytes(), ModelSpec.from_onnx(base).replace(variant="int8")))
    vnni = CpuInfo("test CPU", frozenset({"avx2", "avx512_vnni"}))  # what variant choice and the backend see
    monkeypatch.setattr(variants, "cpu_info", lambda: vnni)
    monkeypatch.setattr(machine, "cpu_info", lambda: vnni)
    assert Classifier.from_file(base, device="cpu").path == int8  # what the unpinned row used to run
    size = ModelSpec.from_onnx(base).image_size[0]
    images = make_dataset(tmp_path / "imgs", per_class=1, size=size)
    cases = [(base, "onnxruntime", ("m.onnx", "fp32")), (int8, "onnxruntime", ("m.int8.onnx", "int8"))]
    if _openvino_installed():
        cases.append((int8, "openvino", ("m.int8.onnx", "int8")))
    for path, backend, want in cases:
        d = end_to_end(path, images, 2, 1, "CPUExecutionProvider", backend)
        assert (d["file"], d["precision"], d["backend"], d["images"]) == (*want, backend, 4)
        assert d["providers"] == (["OpenVINO CPU (f32)"] if backend == "openvino" else ["CPUExecutionProvider"])
        # interleaved rounds: the reported ratio is the median of the rounds' own ratios
        assert len(d["round_ratios"]) == 3 and d["ratio"] == pytest.approx(np.median(d["round_ratios"]), abs=1e-3)
        assert d["model_only_interleaved_images_per_s"] > 0


def test_end_to_end_rows_say_why_instead_of_crashing(tmp_path):
    from cadbcnn_bench.bench import Row, end_to_end_rows
    from cadbcnn_bench.report import write_report
    from cadbcnn_bench.runners import Runner

    def fake(name, path):
        return Runner(name, lambda x: x, lambda t: None, "CPUExecutionProvider", classifier_path=path)

    missing = "OpenVINO not installed (pip install 'cadbcnn[openvino]')"
    runners = {"runtime-openvino-int8": missing, "ort-int8": fake("ort-int8", tmp_path / "gone.onnx"),
               "ort-fp32": fake("ort-fp32", tmp_path / "gone.onnx")}
    rows = [Row("ort-int8", "passed", batch=1, threads=1, images_per_s=10.0), Row("ort-fp32", "failed", "x", 1, 1)]
    e2e = end_to_end_rows(runners, rows, tmp_path, 1, log=lambda *a: None)
    assert e2e["runtime-openvino-int8"] == {"status": "not available", "reason": missing}
    assert e2e["ort-int8"]["status"] == "failed" and "gone.onnx" in e2e["ort-int8"]["reason"]
    assert e2e["ort-fp32"] == {"status": "failed", "reason": "no model-only measurement passed at these threads"}
    cond = {"date": "today", "git_commit": "abc", "cpu": "test CPU", "cores": 2, "isa": {"avx2": True}, "gpu": None,
            "versions": {"python": "3"}, "providers_available": ["CPUExecutionProvider"], "providers_used": {}}
    write_report({"conditions": cond, "rows": [], "checkpoint": "x", "flops_per_image": None, "end_to_end": e2e},
                 tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert f"| runtime-openvino-int8 | not available: {missing} |" in report and "| ort-int8 | failed: " in report


def test_device_cuda_without_a_gpu_says_why_and_exports_nothing(tmp_path):
    """`cadbcnn-bench --device cuda` (make bench-gpu) on a machine without CUDA: a row per GPU format with its
    reason — PyTorch on the GPU and ONNX Runtime's CUDA EP — and no export (no file would be timed)."""
    import torch
    import onnxruntime as ort

    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the GPU rows would run")
    ck = save_random_checkpoint(tmp_path / "ck.pt", model="resnet18", image_size=32)
    r = CliRunner().invoke(app, ["--out", str(tmp_path / "b"), "--checkpoint", str(ck), "--device", "cuda",
                                 "--batch", "1", "--threads", "1", "--min-time", "0.05", "--no-cold-start"])
    assert r.exit_code == 0, r.output
    assert "only PyTorch on the GPU is timed; nothing exported" in r.output and "exporting" not in r.output
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert {x["format"] for x in rows} == {"torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-fp16", "ort-cuda-fp32",
                                           "ort-cuda-fp16"}
    assert all(x["status"] == "not available" for x in rows)
    assert {x["reason"] for x in rows if x["format"].startswith("torch-cuda")} == {
        "no CUDA device for PyTorch (torch.cuda.is_available() is False)"}
    assert "| torch-cuda-bf16 | not available:" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.gpu
def test_torch_cuda_runner_matches_the_cpu(tmp_path):
    """On a CUDA machine: PyTorch on the GPU gives the CPU's logits (fp32 closely, bf16/fp16 autocast loosely) and
    leaves the CPU model where it was."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for PyTorch")
    from cadbcnn_bench.runners import torch_runner
    from cadbcnn_train.checkpoint import load_checkpoint

    model = load_checkpoint(save_random_checkpoint(tmp_path / "ck.pt", model="resnet18", image_size=32)).build_model()
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    cpu = torch_runner(model, "fp32", None).run(x)
    assert np.abs(torch_runner(model, "fp32", None, "cuda").run(x) - cpu).max() < 1e-3
    for precision in ("bf16", "fp16"):
        r = torch_runner(model, precision, None, "cuda")
        assert r.name == f"torch-cuda-{precision}" and np.abs(r.run(x) - cpu).max() < 0.25
    assert next(model.parameters()).device.type == "cpu"
