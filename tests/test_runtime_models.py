"""Runtime vs. models crafted with onnx (main environment): refusals and agreement with the exporter."""

import numpy as np
import onnx
import pytest
import torch

from cadbcnn_export.images import load_image_set
from cadbcnn_export.parity import torch_logits
from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.errors import ModelSpecError
from cadbcnn_runtime.spec import METADATA_KEY
from cadbcnn_train.checkpoint import load_checkpoint
from conftest import make_dataset, save_random_checkpoint


def _with_meta(src, dst, value=None, drop=False, restamp=False):
    """Copy SRC with its spec replaced by VALUE (raw JSON text) or dropped; ``restamp`` re-hashes it as the
    exporter would, so that the graph/spec check (not the integrity check) is what refuses it."""
    m = onnx.load(str(src))
    if restamp:
        from cadbcnn_export.graph import set_spec

        set_spec(m, ModelSpec.from_json(value))
        onnx.save(m, str(dst))
        return dst
    props = [p for p in m.metadata_props if p.key != METADATA_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(props)
    if not drop:
        m.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=value))
    onnx.save(m, str(dst))
    return dst


def test_model_without_spec_is_refused(onnx_model, tmp_path):
    p = _with_meta(onnx_model, tmp_path / "nospec.onnx", drop=True)
    with pytest.raises(ModelSpecError, match="no 'cadbcnn.spec'.*nospec.onnx|nospec.onnx.*no 'cadbcnn.spec'"):
        Classifier.from_file(p, device="cpu")


def test_model_whose_spec_does_not_match_the_graph_is_refused(onnx_model, tmp_path):
    spec = ModelSpec.from_onnx(onnx_model)
    cases = {
        "size": spec.replace(image_size=[224, 224]),
        "classes": spec.replace(class_names=["a", "b", "c"]),
        "input": spec.replace(input_name="pixels"),
        "dtype": spec.replace(input_dtype="float32"),
    }
    for name, bad in cases.items():
        p = _with_meta(onnx_model, tmp_path / f"{name}.onnx", bad.to_json())
        with pytest.raises(ModelSpecError, match="integrity check failed"):  # edited after export
            Classifier.from_file(p, device="cpu")
        p = _with_meta(onnx_model, tmp_path / f"{name}-stamped.onnx", bad.to_json(), restamp=True)
        with pytest.raises(ModelSpecError, match="does not match its spec"):
            Classifier.from_file(p, device="cpu")
    p = _with_meta(onnx_model, tmp_path / "garbage.onnx", "{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        Classifier.from_file(p, device="cpu")


def test_api_cli_and_exporter_parity_path_agree(tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_export.exporter import export_checkpoint
    from cadbcnn_runtime.cli import app

    ck = save_random_checkpoint(tmp_path / "ck.pt", image_size=64, seed=3)
    export_checkpoint(ck, tmp_path / "m.onnx", log=lambda *a: None)
    data = make_dataset(tmp_path / "imgs", per_class=2, size=80, fmt=".jpg")
    files = sorted((data / "Pro").iterdir())
    # exporter parity path: the same bytes through the runtime preprocessing into PyTorch
    s = load_image_set(data / "Pro", ModelSpec.from_onnx(tmp_path / "m.onnx"), ("Benign", "Early", "Pre", "Pro"))
    ref = torch_logits(load_checkpoint(ck).build_model(), s.x)
    ref_p = np.exp(ref - ref.max(1, keepdims=True))
    ref_p /= ref_p.sum(1, keepdims=True)
    clf = Classifier.from_file(tmp_path / "m.onnx", device="cpu")
    api = [clf.predict(f) for f in files]
    r = CliRunner().invoke(app, [str(data / "Pro"), "--model", str(tmp_path / "m.onnx"), "--out",
                                 str(tmp_path / "r.csv"), "-q"])
    assert r.exit_code == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    for i, f in enumerate(files):
        assert api[i].index == int(ref_p[i].argmax())
        assert abs(api[i].confidence - ref_p[i].max()) < 1e-5
        assert rows[i]["path"] == f.name and abs(float(rows[i]["confidence"]) - api[i].confidence) < 1e-5


def _memory_bomb_model(path):
    """A valid cadbcnn model (spec stamped) whose graph asks for batch × 10^11 floats at run time."""
    from onnx import TensorProto, helper

    from cadbcnn_export.graph import set_spec

    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["base"]),
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
        helper.make_node("Mul", ["n", "huge"], ["count"]),                  # depends on the input: not folded
        helper.make_node("ConstantOfShape", ["count"], ["bomb"]),
        helper.make_node("ReduceSum", ["bomb"], ["s"], keepdims=0),
        helper.make_node("Add", ["base", "s"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [i64("axes", [2, 3]), helper.make_tensor("w", TensorProto.FLOAT, [3, 4], [0.1] * 12),
         i64("zero", [0]), i64("one", [1]), i64("huge", [10**11])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    set_spec(m, ModelSpec(name="bomb", version="0", class_names=("Benign", "Early Pre-B", "Pre-B", "Pro-B"),
                          image_size=(64, 64)))
    onnx.save(m, str(path))
    return path


def test_onnx_runtime_failures_at_run_time_are_typed_errors_exit_2(tmp_path):
    """A graph that allocates 10^11 floats per image: ModelRunError from the API, exit 2 from the CLI (in a
    subprocess under an address-space cap, so a misbehaving allocator cannot take the machine down)."""
    import subprocess
    import sys
    import textwrap

    import cv2

    model = _memory_bomb_model(tmp_path / "bomb.onnx")
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
        import numpy as np
        from cadbcnn_runtime import Classifier, ModelRunError
        clf = Classifier.from_file({str(model)!r}, device="cpu")
        try:
            clf.predict(np.zeros((64, 64, 3), np.uint8))
        except ModelRunError as e:
            print("typed:", str(e)[:80])
        from cadbcnn_runtime.cli import app
        sys.argv = ["cadbcnn-infer", {str(tmp_path / 'imgs')!r}, "--model", {str(model)!r}, "--out",
                    {str(tmp_path / 'r.csv')!r}, "-q"]
        app()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "typed:" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2 and "ONNX Runtime failed while running" in r.stderr and "Traceback" not in r.stderr
