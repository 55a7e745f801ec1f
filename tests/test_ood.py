"""Out-of-distribution score: fitted at the end of training, carried in the ONNX graph, applied by the runtime."""

import csv
import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from cadbcnn_export.exporter import export_checkpoint
from cadbcnn_export.parity import torch_outputs
from cadbcnn_runtime import Classifier, ModelSpec
from cadbcnn_runtime.cli import app as infer_app
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.cli import app as train_app
from cadbcnn_train.ood import OODHead, WithOOD, fit_statistics, head_from
from conftest import make_dataset, train_and_export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ood")
    data, _ = train_and_export(d)
    foreign = d / "foreign"
    foreign.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # non-blood inputs: noise, checkerboards, black frames with a bright square
        noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        board = (np.indices((32, 32)).sum(0) // 4 % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
        black = np.zeros((32, 32, 3), np.uint8)
        black[10:20, 10:20] = 255
        for name, img in (("noise", noise), ("board", board), ("black", black)):
            cv2.imwrite(str(foreign / f"{name}-{i}.png"), img)
    return data, d, foreign


def scales(spec: ModelSpec) -> dict[str, float]:
    """Each OOD part's scale (its own threshold, folded into its statistics) as the spec records it."""
    return {p["name"]: p["scale"] for p in spec.ood["parts"]}


def test_mahalanobis_head_matches_numpy():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(200, 6)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 200))
    w, mw = fit_statistics(f, y, 3, shrinkage=0.0)
    cov = np.cov((f.numpy() - np.stack([f.numpy()[y.numpy() == k].mean(0) for k in range(3)])[y.numpy()]).T)
    inv = np.linalg.inv(cov)
    means = np.stack([f.numpy()[y.numpy() == k].mean(0) for k in range(3)])
    x = rng.normal(size=(5, 6))
    ref = np.min([[(xi - m) @ inv @ (xi - m) for m in means] for xi in x], axis=1) / 6
    got = OODHead(w, mw)(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_fit_stores_ood_statistics_and_threshold(trained):
    _, d, _ = trained
    ck = load_checkpoint(d / "run" / "best.pt")
    assert ck.ood is not None and ck.ood["whitening"].shape == (512, 512)
    assert ck.spec.ood["output"] == "ood_score" and ck.spec.ood["threshold"] > 0
    assert "threshold" not in ck.ood  # one home: the spec (the checkpoint keeps the statistics only)
    assert ck.spec.ood["val_flagged"] <= 0.1  # 2 % rule on a tiny (12-image) val split: at most one image


def test_foreign_inputs_score_higher_than_training_like_inputs(trained):
    data, d, foreign = trained
    clf = Classifier.from_file(d / "m.onnx", device="cpu")
    inside = [clf.predict(p) for c in ("Benign", "Pro") for p in sorted((data / c).iterdir())[:8]]
    outside = [clf.predict(p) for p in sorted(foreign.iterdir())]
    assert np.median([p.ood_score for p in outside]) > 3 * np.median([p.ood_score for p in inside])
    assert np.mean([p.out_of_distribution for p in outside]) >= 0.9
    assert np.mean([p.out_of_distribution for p in inside]) <= 0.2
    assert all(p.needs_review for p in outside if p.out_of_distribution)


def test_statistics_round_trip_checkpoint_and_onnx(trained):
    _, d, _ = trained
    ck = load_checkpoint(d / "run" / "best.pt")
    spec = ModelSpec.from_onnx(d / "m.onnx")
    assert spec.ood["threshold"] == pytest.approx(ck.spec.ood["threshold"])
    sess = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "ood_score"]
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    logits, ood = torch_outputs(WithOOD(ck.build_model(), head_from(ck.ood)), x)
    got_logits, got_ood = sess.run(None, {"image": x})
    assert np.abs(got_logits - logits).max() < 1e-4
    assert np.max(np.abs(got_ood - ood) / np.maximum(1, np.abs(ood))) < 1e-4


def test_threshold_from_spec_is_applied_and_overridable(trained):
    data, d, _ = trained
    img = sorted((data / "Pre").iterdir())[0]
    base = Classifier.from_file(d / "m.onnx", device="cpu")
    assert base.ood_threshold == base.spec.ood["threshold"]
    p = base.predict(img)
    assert p.out_of_distribution == (p.ood_score > base.spec.ood["threshold"])
    low = Classifier.from_file(d / "m.onnx", device="cpu", ood_threshold=p.ood_score / 2)
    q = low.predict(img)
    assert q.out_of_distribution and q.needs_review and q.ood_score == pytest.approx(p.ood_score)


def test_cli_columns_and_summary_counts(trained, tmp_path):
    data, d, foreign = trained
    for f in sorted(foreign.iterdir())[:6]:
        (tmp_path / "mix").mkdir(exist_ok=True)
        (tmp_path / "mix" / f.name).write_bytes(f.read_bytes())
    for f in sorted((data / "Early").iterdir())[:4]:
        (tmp_path / "mix" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.csv"
    r = CliRunner().invoke(infer_app, [str(tmp_path / "mix"), "--model", str(d / "m.onnx"), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert "ood_score" in rows[0] and "out_of_distribution" in rows[0]
    flagged = sum(row["out_of_distribution"] == "True" for row in rows)
    assert f"({flagged} out of distribution)" in r.output
    assert flagged >= 5


def test_fit_ood_refits_an_existing_checkpoint(trained, tmp_path):
    data, d, _ = trained
    r = CliRunner().invoke(train_app, ["fit-ood", str(d / "run" / "best.pt"), "--data", str(data),
                                       "--out", str(tmp_path / "re.pt"), "--flag-rate", "0.5"])
    assert r.exit_code == 0, r.output
    before, after = load_checkpoint(d / "run" / "best.pt"), load_checkpoint(tmp_path / "re.pt")
    sb, sa = scales(before.spec), scales(after.spec)
    assert sa["fused"] < sb["fused"]  # a looser rule flags more of val: a lower threshold for the fused part
    assert after.spec.ood["threshold"] == before.spec.ood["threshold"] == 1.0  # folded into the scales
    # the same Gaussian: only the scale folded into the whitening differs
    assert torch.allclose(after.ood["whitening"] * sa["fused"] ** 0.5, before.ood["whitening"] * sb["fused"] ** 0.5,
                          rtol=1e-3, atol=1e-3)


def test_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from cadbcnn_train.ood_eval import auroc

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50).round(1), rng.normal(0.7, size=40).round(1)  # with ties
    ref = roc_auc_score(np.r_[np.zeros(50), np.ones(40)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(ref)


def test_ood_report_structure(trained, tmp_path):
    data, d, _ = trained
    r = CliRunner().invoke(train_app, ["ood-report", str(d / "m.onnx"), "--data", str(data), "--split-file",
                                       str(d / "run" / "split.csv"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads((tmp_path / "rep" / "ood_report.json").read_text())
    assert 0 <= rep["in_distribution_flagged"] <= 1 and rep["n_images"] > 0 and rep["split"] == "test"
    assert "central cell on black background" in rep["sets"] and "non-blood: uniform noise" in rep["sets"]
    for s in rep["sets"].values():
        assert set(s["auroc"]) == {"mahalanobis", "energy", "1-maxsoftmax"} and 0 <= s["flagged"] <= 1
    assert rep["sets"]["non-blood: uniform noise"]["auroc"]["mahalanobis"] > 0.9
    assert "gate" not in rep


def test_ood_gate_on_validation_images(trained, tmp_path):
    """The release gate: every foreign set must be flagged at least --min-foreign-flagged, else exit 3."""
    import json

    data, d, _ = trained
    args = ["ood-report", str(d / "m.onnx"), "--data", str(data), "--split-file", str(d / "run" / "split.csv"),
            "--split", "val", "--n-foreign", "8"]
    r = CliRunner().invoke(train_app, args + ["--out", str(tmp_path / "a"), "--min-foreign-flagged", "0.5"])
    rep = json.loads((tmp_path / "a" / "ood_report.json").read_text())
    assert rep["split"] == "val" and rep["n_images"] == sum(
        1 for line in (d / "run" / "split.csv").read_text().splitlines() if line.endswith(",val"))
    foreign = {n: s["flagged"] for n, s in rep["sets"].items() if s["kind"] == "foreign"}
    assert len(foreign) == 6
    expect_pass = min(foreign.values()) >= 0.5
    assert rep["gate"]["passed"] == expect_pass and (r.exit_code == 0) == expect_pass, r.output
    # an unreachable bar fails, names every foreign set, and still leaves the report for the reader
    r = CliRunner().invoke(train_app, args + ["--out", str(tmp_path / "b"), "--min-foreign-flagged", "1.01"])
    assert r.exit_code == 3 and "Do not ship" in r.output
    rep = json.loads((tmp_path / "b" / "ood_report.json").read_text())
    assert rep["gate"]["passed"] is False and len(rep["gate"]["failed"]) == 6
    assert "Release gate" in (tmp_path / "b" / "ood_report.md").read_text()


def test_explain_writes_gradcam_and_tsne(trained, tmp_path):
    import torch as _t

    from cadbcnn_train.explain import cam_layers, gradcam

    data, d, _ = trained
    r = CliRunner().invoke(train_app, ["explain", str(d / "run" / "best.pt"), "--data", str(data), "--split", "train",
                                       "--out", str(tmp_path / "ex"), "--per-class", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ex" / "gradcam.png").stat().st_size > 1000 and (tmp_path / "ex" / "tsne.png").is_file()
    from PIL import Image

    assert {Image.open(tmp_path / "ex" / f).mode for f in ("gradcam.png", "tsne.png")} == {"P"}  # palette PNGs
    m = load_checkpoint(d / "run" / "best.pt").build_model()
    x = _t.randint(0, 256, (1, 3, 32, 32), dtype=_t.uint8)
    cams = gradcam(m, x, 0, cam_layers(m))
    assert all(c.shape == (32, 32) and 0 <= c.min() and c.max() <= 1 for c in cams.values())


def test_gradcam_reaches_both_cadbcnn_branches():
    from cadbcnn_train.explain import cam_layers, gradcam
    from cadbcnn_train.model import create_model

    torch.manual_seed(0)
    m = create_model("cadbcnn", num_classes=4)
    cams = gradcam(m, torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), 1, cam_layers(m))
    assert set(cams) == {"ResNet18 branch", "ResNet34 branch"}
    assert all(c.shape == (64, 64) and np.isfinite(c).all() for c in cams.values())


def test_derived_variants_keep_the_ood_output_only_when_its_flag_agrees(trained, tmp_path, monkeypatch):
    """INT8/FP16 files carry the OOD output only if their flag reproduces FP32's on the parity images."""
    from dataclasses import replace

    import onnx

    from cadbcnn_export.cli import app as export_app
    from cadbcnn_export.formats import FORMATS

    data, d, _ = trained
    ck = d / "run" / "best.pt"
    base = ["--half", "--int8", "--calibration-data", str(data), "--parity-data", str(data)]
    monkeypatch.setitem(FORMATS, "int8", replace(FORMATS["int8"], min_ood_flag_agreement=1.01))  # unreachable
    monkeypatch.setitem(FORMATS, "fp16", replace(FORMATS["fp16"], min_ood_flag_agreement=0.0))   # always met
    rep = tmp_path / "rep.json"
    r = CliRunner().invoke(export_app, [str(ck), "-o", str(tmp_path / "m.onnx"), *base, "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "OOD output LEFT OUT" in r.output and "the OOD output is left out of m.int8.onnx" in r.output
    import json

    arts = {a["variant"]: a for a in json.loads(rep.read_text())["artifacts"]}
    assert arts["int8"]["written"] and arts["int8"]["parity"]["ood_output"]["kept"] is False
    assert arts["fp16"]["parity"]["ood_output"]["kept"] is True
    # the INT8 file: one output, no OOD statistics left behind, a spec without an OOD entry, still runs
    p8 = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert [o.name for o in p8.graph.output] == ["logits"]
    assert not any(i.name.startswith("ood.") for i in p8.graph.initializer)
    i8 = Classifier.from_file(tmp_path / "m.int8.onnx", device="cpu")
    assert i8.spec.ood is None and i8.ood_threshold is None
    img = sorted((data / "Pre").iterdir())[0]
    p = i8.predict(img)
    assert p.ood_score is None and not p.out_of_distribution
    f16 = Classifier.from_file(tmp_path / "m.fp16.onnx", device="cpu")
    assert f16.spec.ood is not None and f16.predict(img).ood_score is not None
    # --no-gate keeps it (loudly, recorded), and removing it did not change the logits
    r = CliRunner().invoke(export_app, [str(ck), "-o", str(tmp_path / "k.onnx"), *base, "--no-gate"])
    assert r.exit_code == 0, r.output
    assert "keeping an unverified OOD output because --no-gate was given" in r.output
    kept = Classifier.from_file(tmp_path / "k.int8.onnx", device="cpu")
    assert kept.spec.ood is not None
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(kept.run_all(x)[0], i8.run_all(x)[0])


def test_fp16_files_are_valid_onnx_with_or_without_the_ood_output(trained, tmp_path):
    """The FP16 converter appends its I/O Casts at the end of the node list; the file must still be topologically
    sorted ONNX, and leaving out an unverified OOD output (no --parity-data) must keep the logits' producers."""
    import onnx

    from cadbcnn_export.cli import app as export_app

    data, d, _ = trained
    ck = d / "run" / "best.pt"
    r = CliRunner().invoke(export_app, [str(ck), "-o", str(tmp_path / "m.onnx"), "--half"])  # no parity data
    assert r.exit_code == 0, r.output
    assert "the OOD output is left out of m.fp16.onnx" in r.output
    r = CliRunner().invoke(export_app, [str(ck), "-o", str(tmp_path / "k.onnx"), "--half", "--parity-data", str(data)])
    assert r.exit_code == 0, r.output
    for name, outputs in (("m.fp16.onnx", ["logits"]), ("k.fp16.onnx", ["logits", "ood_score"])):
        proto = onnx.load(str(tmp_path / name))
        onnx.checker.check_model(proto)  # raises on an unsorted graph or a missing producer
        assert [o.name for o in proto.graph.output] == outputs
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    dropped = Classifier.from_file(tmp_path / "m.fp16.onnx", device="cpu")
    kept = Classifier.from_file(tmp_path / "k.fp16.onnx", device="cpu")
    assert dropped.spec.ood is None and kept.spec.ood is not None
    # the same logits up to FP16 rounding: with the multi-layer head the stage maps also feed the (FP32) OOD
    # statistics, so ONNX Runtime fuses the FP16 convolutions differently in the two files
    a, b = dropped.run_all(x)[0], kept.run_all(x)[0]
    np.testing.assert_allclose(a, b, atol=1e-2)
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))


def test_int8_leaves_the_feature_vector_unquantized(trained, tmp_path):
    """No Quantize/Dequantize pair on the features the OOD head whitens (its rounding noise swamps the score)."""
    import onnx

    from cadbcnn_export.exporter import ExportOptions

    data, d, _ = trained
    export_checkpoint(d / "run" / "best.pt", tmp_path / "m.onnx",
                      ExportOptions(int8=True, calibration_data=data, no_gate=True), log=lambda *a: None)
    p8 = onnx.load(str(tmp_path / "m.int8.onnx"))
    whitening = next(n for n in p8.graph.node if "ood.whitening" in n.input)
    feature = next(i for i in whitening.input if i != "ood.whitening")
    producer = next(n for n in p8.graph.node if feature in n.output)
    assert producer.op_type != "DequantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and feature in n.input for n in p8.graph.node)


# -- refitting the OOD statistics of an exported model, torch-free (#14 item 2, #13 item 3) -------------------
def test_numpy_statistics_are_the_training_statistics_and_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import ledoit_wolf

    from cadbcnn_runtime import oodstats

    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    y = rng.integers(0, 3, 300)
    w, mw = fit_statistics(torch.tensor(f, dtype=torch.float32), torch.tensor(y), 3)
    st = oodstats.fit_statistics(f.astype(np.float32), y, 3)
    np.testing.assert_allclose(w.numpy(), st.whitening, rtol=1e-5, atol=1e-6)
    centered = f - np.stack([f[y == k].mean(0) for k in range(3)])[y]
    assert oodstats.ledoit_wolf(centered) == pytest.approx(ledoit_wolf(centered, assume_centered=True)[1], rel=1e-6)
    assert oodstats.fit_statistics(f, y, 3, shrinkage="auto").shrinkage >= oodstats.SHRINKAGE
    scores = np.arange(100.0)
    assert oodstats.threshold_for(scores, 0.02) == 98.0 and (scores > 98.0).mean() == 0.01


def test_refit_ood_writes_a_locally_adapted_model_that_passes_parity(trained, tmp_path):
    import onnx

    from cadbcnn_export.cli import main as export_main
    from cadbcnn_export.ood_refit import locate, stored_statistics

    data, d, foreign = trained
    src = d / "m.onnx"
    out = tmp_path / "local.onnx"
    with pytest.raises(SystemExit) as e:
        export_main(["refit-ood", str(src), "--data", str(data), "-o", str(out), "--flag-rate", "0.05",
                     "--report", str(tmp_path / "r.json")])
    assert e.value.code == 0
    before, after = ModelSpec.from_onnx(src), ModelSpec.from_onnx(out)
    step = after.adaptation[-1]
    assert step["step"] == "refit-ood" and step["images_fit"] + step["images_threshold"] == 120
    assert step["source_sha256"] and step["labels"] == "class folders"
    assert scales(after) != scales(before) and after.ood["flag_rate"] == 0.05
    assert "union rule fitted to flag 5 % of held-out local images" in after.ood["threshold_rule"]
    assert after.class_names == before.class_names and after.calibration == before.calibration
    p0, p1 = onnx.load(str(src)), onnx.load(str(out))
    assert locate(p1).feature == after.ood["feature_tensor"]
    assert not np.allclose(stored_statistics(p0)[0], stored_statistics(p1)[0])
    assert [n.op_type for n in p0.graph.node] == [n.op_type for n in p1.graph.node]  # graph untouched
    a, b = Classifier.from_file(src, device="cpu"), Classifier.from_file(out, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(a.run(x), b.run(x))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["parity"]["passed"] and rep["parity"]["logits_identical"]
    # foreign inputs stay flagged after the refit
    assert np.mean([b.predict(p).out_of_distribution for p in sorted(foreign.iterdir())]) >= 0.9


def test_refit_ood_refuses_bad_input_before_writing(trained, tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_export.refit_cli import app as refit_app

    data, d, _ = trained
    out = tmp_path / "x.onnx"
    for args, message in ((["--class-map", "healthy"], "LOCAL_FOLDER=CLASS"),
                          (["--class-map", "healthy=Normal"], "not one of the model's classes"),
                          (["--flag-rate", "0.9"], "--flag-rate"),
                          (["--limit", "20"], "need at least")):
        r = CliRunner().invoke(refit_app, [str(d / "m.onnx"), "--data", str(data), "-o", str(out), *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not out.exists()
    r = CliRunner().invoke(refit_app, [str(d / "m.onnx"), "--data", str(data), "-o", str(d / "m.onnx")])
    assert r.exit_code == 2 and "overwrite the source" in r.output


def _darkened_site(root, *, per_class, seed):
    """A second site: the synthetic classes through a darker camera (×0.9). The 2-epoch test model reads it at
    ~96 %, under refit-ood's bar, hence --force below: the classifier check is tested elsewhere."""
    site = make_dataset(root, per_class=per_class, size=32, seed=seed)
    for f in site.rglob("*.png"):
        cv2.imwrite(str(f), (cv2.imread(str(f)).astype(np.float32) * 0.9).astype(np.uint8))
    return site


def test_refit_ood_refits_the_appearance_check_on_the_sites_images(trained, tmp_path):
    """The appearance check also describes the source lab's images: refit-ood refits it on the same fit /
    held-out images (cuts set on the held-out ones), --keep-appearance keeps it, too few images of a class are
    refused before anything is written."""
    from cadbcnn_export.images import load_image_set
    from cadbcnn_export.ood_refit import class_index
    from cadbcnn_export.refit_cli import app as refit_app
    from cadbcnn_runtime.appearance import appearance_features, fit_appearance
    from cadbcnn_runtime.respec import replace_spec

    data, d, _ = trained
    spec = ModelSpec.from_onnx(d / "m.onnx")
    own = load_image_set(data, spec, class_index(spec, None))
    entry = fit_appearance(appearance_features(own.x), own.labels, spec.class_names, fitted_on="source lab")
    src = tmp_path / "src.onnx"
    src.write_bytes(replace_spec((d / "m.onnx").read_bytes(), spec.replace(appearance=entry)))
    site = _darkened_site(tmp_path / "site", per_class=52, seed=5)
    fresh = _darkened_site(tmp_path / "fresh", per_class=10, seed=6)  # the site's later images
    out = tmp_path / "local.onnx"
    r = CliRunner().invoke(refit_app, [str(src), "--data", str(site), "-o", str(out), "--force"])
    assert r.exit_code == 0 and "appearance check" in r.output, r.output
    after = ModelSpec.from_onnx(out)
    a = after.adaptation[-1]["appearance"]
    assert a["refitted"] and a["source_flagged_held_out"] > 0.9 and a["flagged_held_out"] <= 0.05, a
    assert a["cut_factor"] >= 1 and after.appearance["held_out"]["n"] == 52  # a quarter of 208
    assert (after.appearance["quantile"], after.appearance["smooth_sigma"]) == (entry["quantile"],
                                                                               entry["smooth_sigma"])
    assert "local images from site (class folders)" in after.appearance["fitted_on"]
    assert after.calibration == spec.calibration and after.review_threshold == spec.review_threshold
    later = sorted(fresh.rglob("*.png"))
    with Classifier.from_file(src, device="cpu") as before_clf, Classifier.from_file(out, device="cpu") as clf:
        assert np.mean([p.atypical_appearance for p in before_clf.predict_batch(later)]) > 0.9
        assert np.mean([p.atypical_appearance for p in clf.predict_batch(later)]) <= 0.1
    kept = tmp_path / "kept.onnx"
    r = CliRunner().invoke(refit_app, [str(src), "--data", str(site), "-o", str(kept), "--keep-appearance",
                                       "--force"])
    assert r.exit_code == 0 and "kept: --keep-appearance" in r.output, r.output
    k = ModelSpec.from_onnx(kept)
    assert k.appearance == entry and k.adaptation[-1]["appearance"] == {
        "refitted": False, "source_flagged_held_out": a["source_flagged_held_out"]}
    few = tmp_path / "few.onnx"
    r = CliRunner().invoke(refit_app, [str(src), "--data", str(site), "-o", str(few), "--limit", "100", "--force"])
    assert r.exit_code == 2 and "at least 30 images of each class" in r.output and "--keep-appearance" in r.output
    assert not few.exists()


def test_int8_refits_its_ood_statistics_on_its_own_features(trained, tmp_path):
    """The INT8 file keeps an OOD output fitted on the quantised model's features; its threshold reproduces the
    FP32 flag rate on the parity images; the spec says how it was fitted; the refit's parity is a gate."""
    from cadbcnn_export.exporter import ExportOptions

    data, d, foreign = trained
    rep = export_checkpoint(d / "run" / "best.pt", tmp_path / "m.onnx",
                            ExportOptions(int8=True, calibration_data=data, parity_data=data, no_gate=True),
                            log=lambda *a: None)
    art = next(a for a in rep["artifacts"] if a["variant"] == "int8")
    refit = art["parity"]["ood_refit"]
    assert refit["passed"] and refit["logits_identical"]
    assert any(g["name"].startswith("OOD refit") and g["passed"] for g in art["gates"])
    images = art["parity"]["images"]
    assert images["ood_flagged"] == pytest.approx(images["ood_flagged_ref"], abs=1 / images["n"])
    s8, s32 = ModelSpec.from_onnx(tmp_path / "m.int8.onnx"), ModelSpec.from_onnx(tmp_path / "m.onnx")
    assert s8.ood is not None and scales(s8) != scales(s32)
    assert "own features" in s8.ood["fitted_on"] and "FP32" in s8.ood["threshold_rule"]
    c8 = Classifier.from_file(tmp_path / "m.int8.onnx", device="cpu")
    assert c8.ood_threshold == s8.ood["threshold"]
    assert np.mean([c8.predict(p).out_of_distribution for p in sorted(foreign.iterdir())]) >= 0.9


def test_refit_ood_refuses_a_model_that_misclassifies_the_labelled_images(trained, tmp_path, monkeypatch):
    """A refitted flag stops flagging the site's images, errors included: fine-tune first (or --force)."""
    from typer.testing import CliRunner

    from cadbcnn_export.refit_cli import app as refit_app
    from cadbcnn_runtime import validate

    data, d, _ = trained
    monkeypatch.setitem(validate.RULES, "min_accuracy", 1.01)  # no model can meet it
    out = tmp_path / "x.onnx"
    r = CliRunner().invoke(refit_app, [str(d / "m.onnx"), "--data", str(data), "-o", str(out)])
    assert r.exit_code == 3 and "Fine-tune first" in r.output and "--force" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(refit_app, [str(d / "m.onnx"), "--data", str(data), "-o", str(out), "--force",
                                       "--flag-rate", "0.05"])
    assert r.exit_code == 0 and "WARNING (--force)" in r.output and out.exists(), r.output


def test_refit_ood_is_torch_free(trained, tmp_path):
    """refit-ood needs onnx + onnxruntime + numpy only (not the runtime-only environment: onnx is an export
    dependency), and never imports torch or the training package."""
    import subprocess
    import sys

    data, d, _ = trained
    code = ("import sys\nfrom pathlib import Path\nfrom cadbcnn_export.ood_refit import refit_model\n"
            f"rep = refit_model(Path({str(d / 'm.onnx')!r}), Path({str(tmp_path / 'l.onnx')!r}), "
            f"Path({str(data)!r}), flag_rate=0.05, log=lambda *a: None)\n"
            "assert rep['parity']['passed']\n"
            "assert 'torch' not in sys.modules and 'cadbcnn_train' not in sys.modules, sorted(sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# -- the multi-layer score (#12 item 4): fused features + early ResNet stages, union rule ----------------------
def test_union_rule_flags_the_budget_splits_it_and_ignores_each_stages_own_scale():
    from cadbcnn_runtime import oodstats

    rng = np.random.default_rng(3)
    n = 1000
    held = {"fused": rng.gamma(20, 1 / 20, n), "s1": rng.gamma(5, 1 / 5, n), "s2": rng.gamma(50, 1 / 50, n)}
    # one part: the rule of every model before v0.2.0 (scale 1, the 98th-percentile threshold)
    flagged, strict = oodstats.flag_counts(n)
    assert (flagged, strict) == (19, 4) and oodstats.flag_counts(441) == (8, 2)
    sc, thr, _ = oodstats.part_scales({"fused": held["fused"]}, flagged=flagged, strict=strict)
    assert sc == {"fused": 1.0} and thr == oodstats.threshold_for(held["fused"], 0.02)

    def flags(h):
        sc, thr, rule = oodstats.part_scales(h, flagged=flagged, strict=strict)
        assert thr == 1.0 and "stages together flag the 4" in rule
        parts = np.stack([h[k] / sc[k] for k in h])
        return parts.max(0) > 1, parts[1:].max(0) > 1, h["fused"] > sc["fused"]

    total, by_stages, by_fused = flags(held)
    assert total.sum() == 19 and by_stages.sum() == 4  # the budget, and the stages' share of it
    assert (total == (by_stages | by_fused)).all()     # the union of the parts' own flags
    # a stage whose scores are 10× larger (a lower dimension, a different spread) does not take over the flag
    total10, _, _ = flags({**held, "s2": 10 * held["s2"]})
    np.testing.assert_array_equal(total10, total)


def test_multilayer_head_reads_the_stages_and_the_graph_matches_numpy(trained):
    """The trained model's OOD head has the fused part and one part per early ResNet stage; the ONNX graph's score
    is the maximum of the stored (scaled) parts' numpy scores, and the threshold the spec records is 1."""
    import onnx

    from cadbcnn_export.ood_refit import locate, run_with_features, stored_parts
    from cadbcnn_runtime import oodstats

    _, d, _ = trained
    ck = load_checkpoint(d / "run" / "best.pt")
    assert sorted(ck.ood["stages"]) == ["layer1", "layer2", "layer3"]
    assert [p["name"] for p in ck.spec.ood["parts"]] == ["fused", "layer1", "layer2", "layer3"]
    assert ck.spec.ood["method"] == oodstats.METHOD_MULTI and ck.spec.ood["threshold"] == 1.0
    # the threshold's rule names the union rule, not a percentile of one score (the threshold is 1 by construction)
    assert "union rule" in ck.spec.ood["threshold_rule"] and "percentile" not in ck.spec.ood["threshold_rule"]
    proto = onnx.load(str(d / "m.onnx"))
    where = locate(proto)
    assert where.names == ["fused", "layer1", "layer2", "layer3"]
    x = np.random.default_rng(4).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    _, ood, feats = run_with_features(proto, x)
    assert {k: v.shape[1] for k, v in feats.items()} == {"fused": 512, "layer1": 128, "layer2": 256, "layer3": 512}
    ref = oodstats.combined_scores(stored_parts(proto), feats)
    assert np.max(np.abs(ood - ref) / np.maximum(1, ref)) < 1e-4


def test_fit_ood_with_stain_copies_fits_on_them_and_thresholds_on_clean_val(trained, tmp_path):
    """`fit-ood --stain-copies 1`: the Gaussians are fitted on the training images and one seeded stain copy of each;
    the threshold still flags at most --flag-rate of the clean validation images."""
    data, d, _ = trained
    outs = {}
    for n in (0, 1):
        r = CliRunner().invoke(train_app, ["fit-ood", str(d / "run" / "best.pt"), "--data", str(data), "--out",
                                           str(tmp_path / f"c{n}.pt"), "--flag-rate", "0.1", "--stain-copies", str(n)])
        assert r.exit_code == 0, r.output
        outs[n] = load_checkpoint(tmp_path / f"c{n}.pt")
    n_train = int(outs[0].spec.ood["fitted_on"].split("(")[1].split()[0])
    assert outs[1].spec.ood["fitted_on"] == (f"train split ({n_train} images) + 1 stain copies of each "
                                             f"({n_train} images)")
    assert outs[1].spec.ood["val_flagged"] <= 0.1
    assert not torch.allclose(outs[1].ood["means_w"], outs[0].ood["means_w"])  # the copies moved the statistics
    again = CliRunner().invoke(train_app, ["fit-ood", str(d / "run" / "best.pt"), "--data", str(data), "--out",
                                           str(tmp_path / "c1b.pt"), "--flag-rate", "0.1", "--stain-copies", "1"])
    assert again.exit_code == 0 and torch.equal(load_checkpoint(tmp_path / "c1b.pt").ood["means_w"],
                                                outs[1].ood["means_w"])  # seeded: the same copies
    kept = CliRunner().invoke(train_app, ["fit-ood", str(d / "run" / "best.pt"), "--data", str(data), "--out",
                                          str(tmp_path / "c1l.pt"), "--flag-rate", "0.1", "--stain-copies", "1",
                                          "--stain-keep", "lightness"])
    assert kept.exit_code == 0, kept.output
    ck = load_checkpoint(tmp_path / "c1l.pt")
    assert ck.spec.ood["fitted_on"] == (f"train split ({n_train} images) + 1 stain copies of each, lightness kept "
                                        f"({n_train} images)")
    assert not torch.allclose(ck.ood["means_w"], outs[1].ood["means_w"])  # other copies: their own lightness
