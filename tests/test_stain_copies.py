"""Stain copies: the review checks of a stain-tolerant model fitted on stain-jittered copies of the training images
too (`fit-ood --stain-copies N`, `calibrate MODEL.onnx --appearance-check Q --stain-copies N`)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import ModelSpec
from cadbcnn_runtime.appearance import SMOOTH_SIGMA, appearance_features, fit_appearance
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.preprocess import preprocess, read_image
from cadbcnn_train.augment import RobustAugment, check_stain_copies, stain, stain_copies
from conftest import FOLDERS, onnx_calibration_setup


def _images(n=3, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(40, 230, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_copies_are_seeded_copy_major_and_keep_uint8_rgb():
    imgs = _images()
    a, b = stain_copies(imgs, 2, seed=5), stain_copies(imgs, 2, seed=5)
    assert len(a) == 6 and all(x.dtype == np.uint8 and x.shape == (24, 24, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # deterministic under the seed
    for k in range(2):
        for i, img in enumerate(imgs):  # copy k of image i is item k * n + i, from its own generator
            assert np.array_equal(a[k * 3 + i], stain(img.copy(), np.random.default_rng([5, k, i])))
    assert any(not np.array_equal(x, imgs[i % 3]) for i, x in enumerate(a))  # they do change the colour
    assert not all(np.array_equal(x, y) for x, y in zip(a, stain_copies(imgs, 2, seed=6)))
    assert stain_copies(imgs, 0, seed=5) == []


def test_the_stain_part_of_the_training_augmentation_is_the_same_function():
    img = _images(1)[0]
    aug = RobustAugment(parts=("stain",), p=1.0)
    rng = np.random.default_rng(3)
    expected = stain(aug.base(img, rng), rng)
    assert np.array_equal(aug(img, np.random.default_rng(3)), expected)


@pytest.mark.parametrize("bad", [-1, 9, True, 1.5])
def test_a_bad_number_of_copies_is_refused(bad):
    with pytest.raises(ArgumentError, match="--stain-copies must be a whole number"):
        check_stain_copies(bad)


def test_cli_refuses_bad_copies_before_any_work(tmp_path, onnx_model):
    from cadbcnn_train.cli import app

    base = ["calibrate", str(onnx_model), "--data", str(tmp_path / "nowhere"), "--split-file", str(tmp_path / "x.csv")]
    r = CliRunner().invoke(app, base + ["--stain-copies", "2"])
    assert r.exit_code != 0 and "give --appearance-check 0.98 as well" in r.output, r.output
    r = CliRunner().invoke(app, base + ["--stain-copies", "12", "--appearance-check", "0.98"])
    assert r.exit_code != 0 and "--stain-copies must be a whole number" in r.output, r.output
    r = CliRunner().invoke(app, ["fit-ood", str(tmp_path / "none.pt"), "--data", str(tmp_path), "--stain-copies", "-1"])
    assert r.exit_code != 0 and "--stain-copies must be a whole number" in r.output, r.output


def test_calibrate_fits_the_appearance_check_on_the_copies_too(tmp_path, onnx_model):
    """The check's statistics are those of the training images and their seeded stain copies (the spec's
    training seed), per true class; the field-content check stays the clean images'."""
    from cadbcnn_train.cli import app

    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=40, val_every=5)
    spec = ModelSpec.from_onnx(src)
    args = ["calibrate", str(src), "--data", str(data), "--split-file", str(split), "--appearance-check", "0.98"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "plain.onnx")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "stain.onnx"), "--stain-copies", "2"])
    assert r.exit_code == 0, r.output
    plain, new = ModelSpec.from_onnx(tmp_path / "plain.onnx"), ModelSpec.from_onnx(tmp_path / "stain.onnx")
    assert new.appearance["fitted_on"] == "training split (128 images) + 2 stain copies of each (256 images)"
    assert [new.appearance["classes"][n]["n"] for n in new.class_names] == [96] * 4
    assert new.quality == plain.quality  # the blank-field check: clean training images only
    train = [(read_image(data / p), FOLDERS.index(lab)) for p, lab, sp in rows if sp == "train"]
    imgs, labels = [im for im, _ in train], [k for _, k in train]
    seed = int(spec.training.get("seed", 0))
    everything = imgs + stain_copies(imgs, 2, seed)
    feats = appearance_features(np.stack([preprocess(im, spec) for im in everything]), SMOOTH_SIGMA)
    expected = fit_appearance(feats, np.array(labels * 3), spec.class_names, quantile=0.98, fitted_on="x")
    for n in spec.class_names:
        np.testing.assert_allclose(new.appearance["classes"][n]["mean"], expected["classes"][n]["mean"])
        assert new.appearance["classes"][n]["cut"] == pytest.approx(expected["classes"][n]["cut"])
    assert new.appearance["classes"] != plain.appearance["classes"]
