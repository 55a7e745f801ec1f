"""Stain copies: the review checks of a stain-tolerant model fitted on stain-jittered copies of the training images
too (`fit-ood --stain-copies N`, `calibrate MODEL.onnx --appearance-check Q --stain-copies N`), optionally keeping
each image's lightness (`--stain-keep lightness`)."""

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import ModelSpec
from cadbcnn_runtime.appearance import SMOOTH_SIGMA, appearance_features, fit_appearance
from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.preprocess import preprocess, read_image
from cadbcnn_train.augment import RobustAugment, StainCopies, check_stain_copies, keep_lightness, stain, stain_copies
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


def _lightness(img):
    return cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[..., 0].astype(int)


def test_lightness_kept_copies_have_their_images_lightness_and_the_copies_colour():
    imgs = _images(4, size=32)
    plain = stain_copies(imgs, 2, seed=5)
    kept = stain_copies(imgs, 2, seed=5, keep="lightness")
    assert len(kept) == 8 and all(x.dtype == np.uint8 and x.shape == (32, 32, 3) for x in kept)
    assert all(np.array_equal(x, y) for x, y in zip(kept, stain_copies(imgs, 2, seed=5, keep="lightness")))
    moved = 0
    for j, (p, k) in enumerate(zip(plain, kept)):
        img = imgs[j % 4]
        assert np.array_equal(k, keep_lightness(p, img))  # the plain copy, then the image's L*
        assert np.abs(_lightness(k) - _lightness(img)).mean() < 1.5  # L* kept (8-bit round trip, gamut clipping)
        moved += np.abs(_lightness(p) - _lightness(img)).mean() > 1.5
        ab = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2LAB)[..., 1:].astype(int)  # noqa: E731
        assert np.abs(ab(k) - ab(p)).mean() <= 0.25 * np.abs(ab(img) - ab(p)).mean() + 0.05  # colour of the copy
    assert moved >= 4  # the plain stain copies do change lightness: that is what keeping it undoes


def test_stain_copies_settings_refused_before_any_work_and_described():
    assert not StainCopies() and StainCopies(2) and StainCopies(2, "lightness").about(100) == (
        " + 2 stain copies of each, lightness kept (200 images)")
    assert StainCopies(1).about(7) == " + 1 stain copies of each (7 images)" and StainCopies().about(7) == ""
    with pytest.raises(ArgumentError, match="--stain-keep must be one of nothing, lightness, got 'hue'"):
        StainCopies(2, "hue")
    with pytest.raises(ArgumentError, match="--stain-keep lightness changes the stain copies: give --stain-copies N"):
        StainCopies(0, "lightness")
    with pytest.raises(ArgumentError, match="--stain-copies must be a whole number"):
        StainCopies(9, "lightness")


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
    r = CliRunner().invoke(app, ["fit-ood", str(tmp_path / "none.pt"), "--data", str(tmp_path), "--stain-keep",
                                 "lightness"])  # the checkpoint does not exist: refused before it is looked for
    assert r.exit_code != 0 and "give --stain-copies N too" in r.output, r.output
    r = CliRunner().invoke(app, base + ["--stain-copies", "2", "--appearance-check", "0.98", "--stain-keep", "hue"])
    assert r.exit_code == 2 and "hue" in r.output, r.output


@pytest.mark.parametrize("keep", ["nothing", "lightness"])
def test_calibrate_fits_the_appearance_check_on_the_copies_too(tmp_path, onnx_model, keep):
    """The check's statistics are those of the training images and their seeded stain copies (the spec's
    training seed; with --stain-keep lightness, copies that keep their image's L*), per true class; the
    field-content check stays the clean images'."""
    from cadbcnn_train.cli import app

    src, data, rows, split = onnx_calibration_setup(tmp_path, onnx_model, per_class=40, val_every=5)
    spec = ModelSpec.from_onnx(src)
    args = ["calibrate", str(src), "--data", str(data), "--split-file", str(split), "--appearance-check", "0.98"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "plain.onnx")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "stain.onnx"), "--stain-copies", "2",
                                        "--stain-keep", keep])
    assert r.exit_code == 0, r.output
    plain, new = ModelSpec.from_onnx(tmp_path / "plain.onnx"), ModelSpec.from_onnx(tmp_path / "stain.onnx")
    kept = ", lightness kept" if keep == "lightness" else ""
    assert new.appearance["fitted_on"] == f"training split (128 images) + 2 stain copies of each{kept} (256 images)"
    assert [new.appearance["classes"][n]["n"] for n in new.class_names] == [96] * 4
    assert new.quality == plain.quality  # the blank-field check: clean training images only
    train = [(read_image(data / p), FOLDERS.index(lab)) for p, lab, sp in rows if sp == "train"]
    imgs, labels = [im for im, _ in train], [k for _, k in train]
    seed = int(spec.training.get("seed", 0))
    everything = imgs + stain_copies(imgs, 2, seed, keep)
    feats = appearance_features(np.stack([preprocess(im, spec) for im in everything]), SMOOTH_SIGMA)
    expected = fit_appearance(feats, np.array(labels * 3), spec.class_names, quantile=0.98, fitted_on="x")
    for n in spec.class_names:
        np.testing.assert_allclose(new.appearance["classes"][n]["mean"], expected["classes"][n]["mean"])
        assert new.appearance["classes"][n]["cut"] == pytest.approx(expected["classes"][n]["cut"])
    assert new.appearance["classes"] != plain.appearance["classes"]
