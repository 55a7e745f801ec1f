"""Bad arguments are refused before any work, with exit 2 and a message naming the fix; nothing is written."""

import time

from typer.testing import CliRunner

from cadbcnn_bench.cli import app as bench_app
from cadbcnn_export.cli import app as export_app
from cadbcnn_train.cli import app as train_app
from conftest import make_dataset, save_random_checkpoint

runner = CliRunner()


def test_fit_with_an_unknown_model_fails_before_reading_data(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3, size=16)
    t0 = time.perf_counter()
    r = runner.invoke(train_app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "foo"])
    assert r.exit_code == 2 and "unknown model 'foo'" in r.output and "cadbcnn" in r.output, r.output
    assert not (tmp_path / "run").exists()
    r = runner.invoke(train_app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"),
                                  "--augment-parts", "zoom"])
    assert r.exit_code == 2 and "unknown augmentation" in r.output
    assert time.perf_counter() - t0 < 60  # informational: no dataset decode, no model build


def test_export_argument_errors_exit_2_and_write_nothing(tmp_path):
    ck = save_random_checkpoint(tmp_path / "ck.pt", image_size=32)
    out = tmp_path / "m.onnx"
    cases = {
        ("--int8",): "--int8 needs --calibration-data",
        ("--calibration-method", "foo"): "--calibration-method 'foo'",
        ("--parity-data", str(tmp_path / "missing")): "folder not found",
        ("--opset", "13"): "opset 13",
    }
    for extra, message in cases.items():
        r = runner.invoke(export_app, [str(ck), "-o", str(out), *extra])
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
        assert not out.exists() and not list(tmp_path.glob("m.*.onnx"))
    r = runner.invoke(export_app, [str(ck), "-o", str(tmp_path / "m.txt")])
    assert r.exit_code == 2 and "must end in .onnx" in r.output


def test_bench_missing_data_is_a_usage_error(tmp_path):
    r = runner.invoke(bench_app, ["--out", str(tmp_path / "b"), "--data", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "--data" in r.output and "not found" in r.output, r.output
    assert not (tmp_path / "b").exists()
