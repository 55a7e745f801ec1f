"""`cadbcnn-export adapt-bn`: BatchNorm statistics re-measured on a site's images (AdaBN), folded back into the
exported file, then the OOD flag and the appearance check refitted there."""

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cadbcnn_export.adapt_bn import adapt_model, conv_constants
from cadbcnn_export.adapt_cli import app as adapt_app
from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_train.model import create_model
from cadbcnn_train.onnx_init import load_onnx_weights
from conftest import make_dataset, train_and_export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    data, _ = train_and_export(d)
    site = make_dataset(d / "site", per_class=60, size=32, seed=7)
    for f in site.rglob("*.png"):  # another camera: darker, bluer
        img = cv2.imread(str(f)).astype(np.float32) * np.array([1.0, 0.8, 0.7], np.float32)  # BGR
        cv2.imwrite(str(f), img.astype(np.uint8))
    return data, site, d / "m.onnx"


def _first_bn_input_stats(model_file, folder):
    """Per-channel mean and std of the first convolution's (folded) output over FOLDER's images, as the file
    computes it: the model read back from ONNX, its first BatchNorm an identity carrying the folded bias."""
    spec = ModelSpec.from_onnx(model_file)
    m = create_model(spec.name, num_classes=len(spec.class_names))
    load_onnx_weights(m, model_file)
    m.eval()
    bn = next(x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d))
    seen = []
    h = bn.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))  # before the in-place ReLU
    from cadbcnn_runtime import load_and_preprocess

    x = torch.from_numpy(np.stack([load_and_preprocess(p, spec) for p in sorted(folder.rglob("*.png"))]))
    with torch.no_grad():
        m(x)
    h.remove()
    y = seen[0]
    return y.mean(dim=(0, 2, 3)).numpy(), y.std(dim=(0, 2, 3)).numpy()


def test_adapt_bn_maps_the_sites_statistics_onto_the_reference_and_refits_the_flags(trained, tmp_path):
    data, site, src = trained
    out = tmp_path / "site.onnx"
    (site / "Benign" / "truncated.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # one bad file: skipped, named
    said = []
    try:
        rep = adapt_model(src, out, site, data, images=241, reference_images=120, force=True, log=said.append)
    finally:
        (site / "Benign" / "truncated.jpg").unlink()
    assert any("skipped 1 unreadable image(s): truncated.jpg" in line for line in said), said
    spec, before = ModelSpec.from_onnx(out), ModelSpec.from_onnx(src)
    steps = [s["step"] for s in spec.adaptation]
    assert steps == [*[s["step"] for s in before.adaptation], "adapt-bn", "refit-ood"]
    a = spec.adaptation[-2]
    assert (a["images"], a["reference_images"]) == (224, 120) and a["parity"]["passed"] and a["convolutions"] == 20
    assert rep["refit"]["parity"]["passed"] and spec.ood != before.ood and "from site" in spec.ood["fitted_on"]
    assert spec.calibration == before.calibration  # temperature and review rule: the source's
    # the graph is the source's; only convolution constants (and the OOD head's) differ
    import onnx

    p0, p1 = onnx.load(str(src)), onnx.load(str(out))
    assert [n.op_type for n in p0.graph.node] == [n.op_type for n in p1.graph.node]
    changed = {i.name for i, j in zip(p0.graph.initializer, p1.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(i), onnx.numpy_helper.to_array(j))}
    from cadbcnn_export.ood_refit import locate

    allowed = {n for pair in conv_constants(p0).values() for n in pair}
    allowed |= {n for part in locate(p0).parts for n in (part.whitening, part.means)}  # the OOD refit's
    assert changed and changed <= allowed, changed - allowed
    # AdaBN: the site's first feature map through the adapted file sits where the reference images' sat
    ref_mean, ref_std = _first_bn_input_stats(src, data)
    site_mean, site_std = _first_bn_input_stats(src, site)
    new_mean, new_std = _first_bn_input_stats(out, site)
    assert np.abs(site_mean - ref_mean).max() > 0.1  # the camera moved it
    # within a few % of a standard deviation (train-mode batch statistics over 224 of the 240 images, not exact sums)
    assert np.abs(new_mean - ref_mean).max() < 0.05 * ref_std.min() < np.abs(site_mean - ref_mean).max() / 4
    np.testing.assert_allclose(new_std, ref_std, rtol=0.05)
    assert np.abs(site_std / ref_std - 1).max() > 0.1
    with Classifier.from_file(out, device="cpu") as clf:  # loads and runs as users will
        assert len(clf.predict_batch(sorted(site.rglob("*.png"))[:4])) == 4


def test_adapt_bn_cli_refuses_bad_arguments_before_any_work(trained, tmp_path):
    data, site, src = trained
    out = tmp_path / "x.onnx"
    base = [str(src), "--data", str(site), "--reference", str(data), "-o", str(out)]
    for args, message in ((["--images", "8"], "--images and --reference-images must be >= 32"),
                          (["--reference-split", str(tmp_path / "none.csv")], "file not found")):
        r = CliRunner().invoke(adapt_app, [*base, *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    r = CliRunner().invoke(adapt_app, [str(src), "--data", str(tmp_path / "nowhere"), "--reference", str(data),
                                       "-o", str(out)])
    assert r.exit_code == 2 and "folder not found" in r.output
    r = CliRunner().invoke(adapt_app, [str(src), "--data", str(site), "--reference", str(data), "-o", str(src)])
    assert r.exit_code == 2 and "overwrite the source" in r.output
    few = tmp_path / "few"
    make_dataset(few, per_class=2, size=32)
    r = CliRunner().invoke(adapt_app, [str(src), "--data", str(few), "--reference", str(data), "-o", str(out),
                                       "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "at least 32" in r.output
    assert not out.exists()
