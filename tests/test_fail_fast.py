"""Bad arguments are refused before any work, with exit 2 and a message naming the fix; nothing is written."""


from typer.testing import CliRunner

from cadbcnn_bench.cli import app as bench_app
from cadbcnn_export.cli import app as export_app
from cadbcnn_train.cli import app as train_app
from conftest import make_dataset, save_random_checkpoint

runner = CliRunner()


def test_fit_with_an_unknown_model_fails_before_reading_data(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3, size=16)
    r = runner.invoke(train_app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "foo"])
    assert r.exit_code == 2 and "'foo' is not one of" in r.output and "cadbcnn" in r.output, r.output
    assert not (tmp_path / "run").exists()
    r = runner.invoke(train_app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"),
                                  "--augment-parts", "zoom"])
    assert r.exit_code == 2 and "unknown augmentation" in r.output
    assert not (tmp_path / "run").exists()


def test_export_argument_errors_exit_2_and_write_nothing(tmp_path):
    ck = save_random_checkpoint(tmp_path / "ck.pt", image_size=32)
    out = tmp_path / "m.onnx"
    cases = {
        ("--int8",): "--int8 needs --calibration-data",
        ("--calibration-method", "foo"): "'foo' is not one of",
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


def test_model_names_have_one_home():
    from cadbcnn_train.config import MODEL_NAMES
    from cadbcnn_train.model import MODELS

    assert tuple(MODELS) == MODEL_NAMES  # the torch-free list the CLI offers is the builders' list


def test_choices_are_refused_by_the_cli_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_bench.cli import app as bench_app
    from cadbcnn_export.cli import app as export_app
    from cadbcnn_train.cli import app as train_app

    r = CliRunner().invoke(train_app, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--precision",
                                       "fp64"])
    assert r.exit_code == 2 and "fp64" in r.output and not (tmp_path / "o").exists()
    r = CliRunner().invoke(export_app, [str(tmp_path / "x.pt"), "-o", str(tmp_path / "m.onnx"),
                                        "--calibration-method", "median"])
    assert r.exit_code == 2 and "median" in r.output
    r = CliRunner().invoke(bench_app, ["--out", str(tmp_path / "b"), "--device", "tpu"])
    assert r.exit_code == 2 and "tpu" in r.output and not (tmp_path / "b").exists()


def test_a_failed_gate_prints_its_report_and_exits_3(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cadbcnn_runtime.errors import ArgumentError, GateError, ImageError
    from cadbcnn_runtime.exits import cli_errors

    app = typer.Typer()

    @app.command()
    @cli_errors
    def cmd(kind: str):
        raise {"gate": GateError("gate failed", report="| set | flagged |"), "arg": ArgumentError("bad --x"),
               "image": ImageError("a.jpg: truncated")}[kind]

    r = CliRunner().invoke(app, ["gate"])
    assert r.exit_code == 3 and "| set | flagged |" in r.output and "error: gate failed" in r.output
    assert CliRunner().invoke(app, ["arg"]).exit_code == 2
    assert CliRunner().invoke(app, ["image"]).exit_code == 2  # a per-file error that stopped a command
