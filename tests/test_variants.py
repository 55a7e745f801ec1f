"""Which variant of a model runs (#13): auto picks INT8 on VNNI CPUs, FP16 on CUDA, else FP32 — torch-free."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import Classifier
from cadbcnn_runtime import variants
from cadbcnn_runtime.cli import app
from cadbcnn_runtime.errors import ArgumentError, ModelSpecError
from cadbcnn_runtime.machine import CpuInfo, parse_cpuinfo
from cadbcnn_runtime.respec import replace_spec
from cadbcnn_runtime.spec import ModelSpec

pytestmark = pytest.mark.runtime

VNNI = CpuInfo("test CPU", frozenset({"avx2", "avx512f", "avx512_vnni"}))
AVX2 = CpuInfo("test CPU", frozenset({"avx2"}))


def test_cpu_flags_are_parsed():
    info = parse_cpuinfo("processor: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx_vnni\n")
    assert info.name == "Some CPU" and info.has_vnni and not info.has_bf16 and info.isa == "AVX2 VNNI"
    assert not parse_cpuinfo("flags: avx2 avx512f avx512_bf16\n").has_vnni


def test_choose_rules(tmp_path):
    base = tmp_path / "m.onnx"
    base.write_bytes(b"x")
    assert variants.choose(base, "auto", cuda=False, cpu=VNNI)[:2] == ("fp32", base)  # no INT8 file: FP32
    (tmp_path / "m.int8.onnx").write_bytes(b"x")
    key, path, why = variants.choose(base, "auto", cuda=False, cpu=VNNI)
    assert (key, path.name) == ("int8", "m.int8.onnx") and "VNNI" in why
    key, path, why = variants.choose(base, "auto", cuda=False, cpu=AVX2)
    assert key == "fp32" and "no VNNI" in why and "--precision int8" in why
    assert variants.choose(base, "int8", cuda=False, cpu=AVX2)[0] == "int8"  # asked for: used
    with pytest.raises(ArgumentError, match=r"m\.fp16\.onnx.*--half"):
        variants.choose(base, "fp16", cuda=True, cpu=AVX2)
    (tmp_path / "m.fp16.onnx").write_bytes(b"x")
    assert variants.choose(base, "auto", cuda=True, cpu=VNNI)[0] == "fp16"
    assert variants.choose(base, "auto", cuda=False, cpu=VNNI)[0] == "int8"  # FP16 is for CUDA only
    with pytest.raises(ArgumentError, match="precision must be"):
        variants.choose(base, "bf16", cuda=False, cpu=VNNI)


@pytest.fixture
def model_with_int8(onnx_model, tmp_path):
    """The test model plus an 'INT8 file' next to it (the same graph, its spec saying int8 — selection only)."""
    base = tmp_path / "m.onnx"
    shutil.copy(onnx_model, base)
    spec = ModelSpec.from_onnx(base)
    (tmp_path / "m.int8.onnx").write_bytes(replace_spec(base.read_bytes(), spec.replace(variant="int8")))
    return base


def test_classifier_picks_int8_only_with_vnni(model_with_int8, monkeypatch):
    monkeypatch.setattr(variants, "cpu_info", lambda: VNNI)
    clf = Classifier.from_file(model_with_int8, device="cpu")
    assert clf.precision == "int8" and clf.path.name == "m.int8.onnx" and "VNNI" in clf.precision_reason
    assert Classifier.from_file(model_with_int8, device="cpu", precision="fp32").path.name == "m.onnx"
    monkeypatch.setattr(variants, "cpu_info", lambda: AVX2)
    clf = Classifier.from_file(model_with_int8, device="cpu")
    assert clf.precision == "fp32" and clf.path.name == "m.onnx" and "no VNNI" in clf.precision_reason
    named = Classifier.from_file(model_with_int8.with_name("m.int8.onnx"), device="cpu")
    assert named.precision == "int8" and named.precision_reason == "the file named"
    with pytest.raises(ArgumentError, match="pass the FP32 model"):
        Classifier.from_file(model_with_int8.with_name("m.int8.onnx"), device="cpu", precision="fp32")


def test_a_variant_of_another_model_is_never_used(model_with_int8, monkeypatch):
    monkeypatch.setattr(variants, "cpu_info", lambda: VNNI)
    other = model_with_int8.with_name("m.int8.onnx")
    spec = ModelSpec.from_onnx(other)
    other.write_bytes(replace_spec(other.read_bytes(), spec.replace(class_names=list(reversed(spec.class_names)))))
    with pytest.raises(ModelSpecError, match="not a variant of the same model"):
        Classifier.from_file(model_with_int8, device="cpu")


def test_cli_prints_the_choice_and_refuses_unknown_precision(model_with_int8, tmp_path, monkeypatch):
    monkeypatch.setattr(variants, "cpu_info", lambda: VNNI)
    folder = tmp_path / "in"
    folder.mkdir()
    r = CliRunner().invoke(app, [str(folder), "--model", str(model_with_int8), "--out", "-"])
    assert r.exit_code == 0 and "precision int8: this CPU has VNNI" in r.output, r.output
    r = CliRunner().invoke(app, [str(folder), "--model", str(model_with_int8), "--precision", "bf16"])
    assert r.exit_code == 2 and "bf16" in r.output
