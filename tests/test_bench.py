"""Smoke test of cadbcnn-bench: report structure only — never speeds."""

import json

from typer.testing import CliRunner

from cadbcnn_bench.cli import app
from conftest import make_dataset, save_random_checkpoint


def test_bench_smoke_report_structure(tmp_path):
    ck = save_random_checkpoint(tmp_path / "ck.pt", model="resnet18", image_size=32)
    data = make_dataset(tmp_path / "data", per_class=3, size=32)
    r = CliRunner().invoke(app, ["--out", str(tmp_path / "b"), "--checkpoint", str(ck), "--data", str(data),
                                 "--batch", "1,2", "--threads", "1", "--min-time", "0.05", "--no-cold-start"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = res["rows"]
    formats = {x["format"] for x in rows}
    assert {"torch-fp32", "torch-bf16", "ort-fp32", "ort-int8"} <= formats
    for x in rows:
        assert x["status"] in ("passed", "failed", "not available")
        if x["status"] == "passed":
            assert x["p50_ms"] > 0 and x["images_per_s"] > 0 and x["p99_ms"] >= x["p50_ms"] and x["runs"] >= 3
        else:
            assert x["reason"]
    for f in ("ort-fp32", "ort-int8", "torch-fp32"):
        assert {x["batch"] for x in rows if x["format"] == f and x["status"] == "passed"} == {1, 2}
    assert next(x for x in rows if x["format"] == "ort-fp32" and x["batch"] == 1)["vs_ort_fp32"] == 1.0
    assert set(res["accuracy"]) >= {"torch-fp32", "ort-fp32", "ort-int8"}
    assert 0 <= res["accuracy"]["ort-int8"]["top1"] <= 1
    assert res["end_to_end"]["ort-fp32"]["images"] == 12
    cond = res["conditions"]
    assert cond["cores"] >= 1 and "onnxruntime" in cond["versions"] and "avx512f" in cond["isa"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| ort-int8 | passed |" in report and "Accuracy per format" in report
    # the best peer, OpenVINO on the same files: measured and compared, or a row that says it is not installed
    peers = [x for x in rows if x["format"].startswith("openvino")]
    assert {x["format"] for x in peers} == {"openvino-fp32-default", "openvino-fp32-f32", "openvino-int8"}
    try:
        import openvino  # noqa: F401
    except ImportError:
        assert all(x["status"] == "not available" and "not installed" in x["reason"] for x in peers)
    else:
        ov_rows = [x for x in peers if x["status"] == "passed"]
        assert {x["batch"] for x in ov_rows} == {1, 2}
        assert min(x["vs_best_peer"] for x in ov_rows) == 1.0
        assert next(x for x in rows if x["format"] == "ort-fp32" and x["batch"] == 1)["vs_best_peer"] > 0
        assert abs(res["accuracy"]["openvino-fp32-f32"]["agreement_with_fp32"] - 1.0) < 1e-9
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
