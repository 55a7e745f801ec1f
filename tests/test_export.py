import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from cadbcnn_export import exporter as E
from cadbcnn_export import graph as G
from cadbcnn_export.cli import app
from cadbcnn_export.formats import FORMATS
from cadbcnn_runtime.spec import METADATA_KEY, ModelSpec
from cadbcnn_train.checkpoint import load_checkpoint
from conftest import make_dataset, save_random_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size (224-px) CADBCNN with random weights, exported once."""
    d = tmp_path_factory.mktemp("full")
    ck = save_random_checkpoint(d / "ck.pt", image_size=224)
    report = E.export_checkpoint(ck, d / "m.onnx", log=lambda *a: None)
    return ck, d / "m.onnx", report


@pytest.mark.slow
def test_full_size_export_parity_at_several_batch_sizes(full_size):
    ck, path, report = full_size
    assert report["passed"] and report["artifacts"][0]["written"]
    model = load_checkpoint(ck).build_model()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "image" and sess.get_inputs()[0].type == "tensor(uint8)"
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # dynamic batch
    for b in (1, 2, 7, 32):
        x = np.random.default_rng(b).integers(0, 256, (b, 3, 224, 224), dtype=np.uint8)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {"image": x})[0]
        assert got.shape == (b, 4)
        assert np.abs(ref - got).max() <= 1e-4, b


@pytest.mark.slow
def test_spec_is_embedded_and_round_trips(full_size):
    ck, path, _ = full_size
    spec = ModelSpec.from_onnx(path)
    c = load_checkpoint(ck)
    assert spec.class_names == ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert spec.image_size == (224, 224) and spec.variant == "fp32" and spec.input_name == "image"
    assert spec.weights_sha256 == E.weights_sha256(c.state_dict)
    assert spec.software["onnxruntime"] == ort.__version__
    m = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in m.metadata_props}
    assert ModelSpec.from_json(meta[METADATA_KEY]) == spec  # plain JSON, no repr/eval
    json.loads(meta[METADATA_KEY])


@pytest.mark.slow
def test_cross_attention_is_intact_in_the_graph(full_size, tmp_path):
    _, path, _ = full_size
    m = onnx.load(str(path))
    softmax = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 2, "one Softmax per attention direction"
    matmuls = G.attention_matmuls(m)
    assert len(matmuls) >= 4, "QKᵀ and attention·V in both directions are real MatMuls between activations"
    # Expose the attention weights as extra outputs of a test copy and check they depend on the input.
    for n in softmax:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n.output[0] for n in softmax]
    rng = np.random.default_rng(0)
    a = sess.run(names, {"image": rng.integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)})
    b = sess.run(names, {"image": rng.integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)})
    for wa, wb in zip(a, b):
        assert wa.shape == (2, 8, 49, 49)  # (batch, heads, query tokens, key tokens)
        np.testing.assert_allclose(wa.sum(-1), 1.0, atol=1e-5)
        assert np.abs(wa - wb).max() > 1e-4, "attention weights must change with the input"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    ck = save_random_checkpoint(d / "ck.pt", image_size=64)
    data = make_dataset(d / "images", per_class=6, size=64)
    return ck, data, d


def test_failed_parity_gate_leaves_no_file_and_exits_nonzero(small, tmp_path, monkeypatch):
    ck, data, _ = small
    real = E.torch_to_onnx

    def perturbed(*a, **k):
        proto = real(*a, **k)
        for init in proto.graph.initializer:  # nudge the classifier bias
            arr = onnx.numpy_helper.to_array(init)
            if arr.shape == (4,) and arr.dtype == np.float32:
                init.CopyFrom(onnx.numpy_helper.from_array(arr + 0.01, init.name))
        return proto

    monkeypatch.setattr(E, "torch_to_onnx", perturbed)
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, [str(ck), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 3, r.output
    assert "parity gate failed" in r.output and "max |Δlogit|" in r.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] is False and rep["artifacts"][0]["written"] is False


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    r = runner.invoke(app, [str(bad), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "cannot be read as a cadbcnn checkpoint" in r.output
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    r = runner.invoke(app, [str(tmp_path / "foreign.pt"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "not a cadbcnn checkpoint" in r.output
    r = runner.invoke(app, [str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "not found" in r.output


def test_int8_fp16_and_fp16_weights_variants(small, tmp_path):
    ck, data, _ = small
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, [str(ck), "-o", str(out), "--half", "--int8", "--calibration-data", str(data),
                            "--parity-data", str(data), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    arts = {a["variant"]: a for a in rep["artifacts"]}
    assert set(arts) == {"fp32", "fp16", "int8"} and all(a["written"] and a["passed"] for a in arts.values())
    assert ModelSpec.from_onnx(tmp_path / "m.int8.onnx").variant == "int8"
    assert ModelSpec.from_onnx(tmp_path / "m.fp16.onnx").variant == "fp16"
    assert arts["int8"]["size_bytes"] < 0.35 * arts["fp32"]["size_bytes"]
    assert "per_class" in arts["int8"]["parity"]["images"]  # labelled parity data → per-class accuracy
    int8 = onnx.load(str(tmp_path / "m.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    # a quantised Conv's ReLU is quantised with it (Conv → Q → DQ → ReLU would requantise every activation)
    prod = {o: n for n in int8.graph.node for o in n.output}

    def src(n, op):
        p = prod.get(n.input[0])
        return p if p is not None and p.op_type == op else None

    requantised = [r.name for r in int8.graph.node if r.op_type == "Relu"
                   and (dq := src(r, "DequantizeLinear")) and (q := src(dq, "QuantizeLinear")) and src(q, "Conv")]
    quantised_convs = [c for c in int8.graph.node if c.op_type == "Conv" and prod.get(c.input[1]) is not None]
    assert quantised_convs and not requantised, requantised
    # fp32 compute with fp16-stored weights: about half the size, same predictions
    out2 = tmp_path / "c.onnx"
    r = runner.invoke(app, [str(ck), "-o", str(out2), "--fp16-weights", "--parity-data", str(data)])
    assert r.exit_code == 0, r.output
    assert out2.stat().st_size < 0.55 * out.stat().st_size
    assert ModelSpec.from_onnx(out2).variant == "fp32-fp16weights"


def test_variant_gate_failure_blocks_the_file_unless_no_gate(small, tmp_path, monkeypatch):
    ck, data, _ = small
    from dataclasses import replace

    monkeypatch.setitem(FORMATS, "int8", replace(FORMATS["int8"], min_top1_agreement=1.01))  # impossible
    args = [str(ck), "-o", str(tmp_path / "m.onnx"), "--int8", "--calibration-data", str(data),
            "--calibration-size", "8", "--parity-data", str(data)]
    r = runner.invoke(app, args)
    assert r.exit_code == 3 and "int8 gate failed" in r.output
    assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.int8.onnx").exists()
    r = runner.invoke(app, args + ["--no-gate"])
    assert r.exit_code == 0 and "WARNING" in r.output
    assert (tmp_path / "m.int8.onnx").exists()


def test_int8_needs_calibration_data(small, tmp_path):
    ck, _, _ = small
    r = runner.invoke(app, [str(ck), "-o", str(tmp_path / "m.onnx"), "--int8"])
    assert r.exit_code == 2 and "--calibration-data" in r.output  # a usage error, refused before any work
    assert not (tmp_path / "m.onnx").exists()


def test_export_carries_no_source_paths_or_line_numbers(small, tmp_path):
    """Exports are reproducible across edits of the model's source: no per-node debug records (stack traces
    with paths and line numbers), which also never leak the build machine's paths."""
    import onnx

    ck, _, _ = small
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, [str(ck), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out))
    assert not [p.key for n in m.graph.node for p in n.metadata_props]
    assert b"cadbcnn_train/model.py" not in out.read_bytes()


# -- INT8 from an exported model (#13 item 4): torch-free, gated --------------------------------------------
def _int8_inputs(onnx_model, tmp_path):
    spec = ModelSpec.from_onnx(onnx_model)
    folders = tuple((spec.training or {}).get("class_folders") or spec.class_names)
    data = make_dataset(tmp_path / "d", per_class=6, size=64, classes=folders)
    return spec, data


def test_int8_from_onnx_writes_a_gated_variant_without_torch(onnx_model, tmp_path):
    spec, data = _int8_inputs(onnx_model, tmp_path)
    out = tmp_path / "new" / "folder" / "m.int8.onnx"  # made by the exporter (as --report's folder is)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cadbcnn_export.from_onnx import int8_from_onnx\n"
        "from cadbcnn_export.gates import ExportOptions\n"
        f"rep = int8_from_onnx(Path({str(onnx_model)!r}), Path({str(out)!r}), ExportOptions(int8=True, "
        f"calibration_data=Path({str(data)!r}), parity_data=Path({str(data)!r})), log=lambda *a: None)\n"
        "assert rep['passed'] and 'torch' not in sys.modules and 'cadbcnn_train' not in sys.modules, sorted(sys.modules)\n"
        "print('torch-free')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "torch-free" in r.stdout, r.stderr[-2000:]
    s8 = ModelSpec.from_onnx(out)
    assert s8.variant == "int8" and s8.class_names == spec.class_names and s8.calibration == spec.calibration
    from cadbcnn_runtime import Classifier

    with Classifier.from_file(out, device="cpu") as clf:
        assert clf.precision == "int8"


def test_int8_from_onnx_gate_failure_and_argument_errors(onnx_model, tmp_path, monkeypatch):
    import onnx as onnx_mod

    from cadbcnn_export import from_onnx

    spec, data = _int8_inputs(onnx_model, tmp_path)
    out = tmp_path / "m.int8.onnx"
    base: list[str] = []
    for extra, message in ((["--from-onnx", str(onnx_model), "-o", str(out), "--calibration-data", str(data)],
                            "pass --int8"),
                           ([str(tmp_path / "ck.pt"), "--from-onnx", str(onnx_model), "-o", str(out), "--int8",
                             "--calibration-data", str(data)], "exactly one"),
                           (["--from-onnx", str(onnx_model), "-o", str(out), "--int8", "--half",
                             "--calibration-data", str(data)], "--half"),
                           # a parent that is a file: refused before calibrating, not when writing at the end
                           (["--from-onnx", str(onnx_model), "-o", str(onnx_model / "m.int8.onnx"), "--int8",
                             "--calibration-data", str(data)], "is a file, not a folder")):
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2 and message in r.output, r.output
        assert not out.exists()
    real = from_onnx.to_int8

    def broken(src, dst, calib, **kw):  # a quantiser that flips the ranking of the classes
        real(src, dst, calib, **kw)
        m = onnx_mod.load(str(dst))
        prod = next(n for n in m.graph.node if "logits" in n.output)
        prod.output[list(prod.output).index("logits")] = "logits_raw"
        m.graph.node.append(onnx_mod.helper.make_node("Neg", ["logits_raw"], ["logits"]))
        onnx_mod.save(m, str(dst))

    monkeypatch.setattr(from_onnx, "to_int8", broken)
    r = runner.invoke(app, ["--from-onnx", str(onnx_model), "-o", str(out), "--int8", "--calibration-data", str(data),
                            "--parity-data", str(data)])
    assert r.exit_code == 3 and "top-1 agreement" in r.output and "NOT written" in r.output, r.output
    assert not out.exists()
