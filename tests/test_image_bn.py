"""`cadbcnn-export image-bn`: every trunk BatchNorm mixes the training lab's statistics with the image's own,
inside the graph; checked against the PyTorch twin and refitted OOD statistics."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cadbcnn_export import image_bn
from cadbcnn_export.adapt_bn import PARITY_ATOL
from cadbcnn_export.image_bn_cli import app as image_bn_app
from cadbcnn_export.parity import ort_session
from cadbcnn_runtime import Classifier, ModelSpec
from conftest import train_and_export


def _tiny_conv_graph(rng):
    """image (N,2,5,5) → Conv (a trunk's, 3 channels, bias) → Relu → out."""
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "model.net.conv1.weight", "model.net.conv1.bias"], ["y"], pads=[1] * 4),
             helper.make_node("Relu", ["y"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "model.net.conv1.weight"),
                           numpy_helper.from_array(b, "model.net.conv1.bias")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_insert_computes_the_mixed_batchnorm_per_image_and_alpha_zero_is_the_identity():
    rng = np.random.default_rng(0)
    proto = _tiny_conv_graph(rng)
    ref = rng.normal(size=(40, 2, 5, 5)).astype(np.float32)
    stats, seen = image_bn.reference_statistics(proto, [ref[:16], ref[16:]])
    assert seen == 40 and list(stats) == ["y"]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    y_ref = ort_session(probe.SerializeToString()).run(["y"], {"x": ref})[0]
    np.testing.assert_allclose(stats["y"][0], y_ref.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["y"][1], y_ref.var(axis=(0, 2, 3)), rtol=1e-4)

    x = (rng.normal(size=(3, 2, 5, 5)) * [[[[1.5]], [[0.5]]]] + 0.7).astype(np.float32)  # another "camera"
    y = ort_session(probe.SerializeToString()).run(["y"], {"x": x})[0]
    m, s2 = (v[None, :, None, None] for v in stats["y"])
    for alpha in (0.0, 0.3):
        mixed = onnx.ModelProto()
        mixed.CopyFrom(proto)
        assert image_bn.insert(mixed, stats, alpha) == (alpha > 0)
        if alpha == 0.0:  # nothing to mix: the graph is left as it was
            assert not image_bn.already_mixed(mixed) and mixed == proto
            continue
        got = ort_session(mixed.SerializeToString()).run(None, {"x": x})[0]
        # the definition: BatchNorm of the (pre-BN) signal with mixed statistics; Y is already BN'd with the
        # reference's, so in Y's terms mu = (1-a) m + a mu_img, var = (1-a) s2 + a var_img, mapped back onto (m, s2)
        mu_i, var_i = y.mean(axis=(2, 3), keepdims=True), y.var(axis=(2, 3), keepdims=True)
        mu, var = (1 - alpha) * m + alpha * mu_i, (1 - alpha) * s2 + alpha * var_i
        want = np.maximum(m + (y - mu) * np.sqrt(s2 / var), 0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, np.maximum(y, 0), atol=1e-3)
    with pytest.raises(Exception, match="already normalises"):
        image_bn.insert(mixed, stats, 0.1)
    with pytest.raises(Exception, match="alpha"):
        image_bn.insert(proto, stats, 1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("image_bn")
    data, model = train_and_export(d, per_class=60)
    return data, model


def test_image_bn_writes_a_checked_file_with_refitted_ood_and_refuses_bad_arguments(trained, tmp_path):
    data, src = trained
    out = tmp_path / "mixed.onnx"
    (data / "Benign" / "truncated.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # one bad file: skipped, named
    said = []
    try:
        rep = image_bn.image_bn_model(src, out, data, alpha=0.2, images=64, log=said.append)
    finally:
        (data / "Benign" / "truncated.jpg").unlink()
    assert any("skipped 1 unreadable image(s): truncated.jpg" in line for line in said), said
    spec, before = ModelSpec.from_onnx(out), ModelSpec.from_onnx(src)
    step = spec.adaptation[-1]
    assert step["step"] == "image-bn" and step["alpha"] == {s: 0.2 for s in image_bn.STAGES} and step["reference_images"] == 64
    assert step["convolutions"] == 20 and step["parity"]["passed"] and step["parity"]["images"] == 16
    assert step["parity"]["max_abs_diff"] <= PARITY_ATOL
    assert spec.ood != before.ood and 0 < step["ood"]["flagged_held_out"] <= 0.1
    assert spec.calibration == before.calibration and rep["size_bytes"] == out.stat().st_size
    # the file works as users load it, and per-image statistics change what a shifted image reads as
    x = np.stack([Classifier.from_file(src, device="cpu").preprocess(p) for p in sorted(data.rglob("*.png"))[:8]])
    dark = (x.astype(np.float32) * 0.6).astype(np.uint8)
    with Classifier.from_file(src, device="cpu") as a, Classifier.from_file(out, device="cpu") as b:
        assert not np.allclose(a.run(dark), b.run(dark), atol=1e-3)
        assert len(b.classify(dark)) == 8
    runner = CliRunner()
    for args, msg in ((["--alpha", "1.5"], "--alpha"), (["--images", "8"], "--images"),
                      (["-o", str(src)], "overwrite")):
        argv = [str(src), "--reference", str(data), "-o", str(tmp_path / "x.onnx"), *args]
        r = runner.invoke(image_bn_app, argv)
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / "x.onnx").exists()
    r = runner.invoke(image_bn_app, [str(out), "--reference", str(data), "-o", str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "already normalises" in r.output and not (tmp_path / "y.onnx").exists()
