"""Robust augmentation and the shared shift transforms: deterministic under a seed, uint8 RGB in and out."""

import numpy as np
import pytest

from cadbcnn_train import transforms as T
from cadbcnn_train.augment import PARTS, RobustAugment, parse_augment_parts
from cadbcnn_train.config import TrainConfig


def image(seed=0, h=96, w=96):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("part", PARTS + ("robust",))
def test_each_part_is_deterministic_and_keeps_uint8_rgb(part):
    aug = RobustAugment(parts=parse_augment_parts(part)[0])
    for seed in range(6):
        a = aug(image(seed), np.random.default_rng(seed))
        b = aug(image(seed), np.random.default_rng(seed))
        assert a.dtype == np.uint8 and a.shape == (96, 96, 3) and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
    outs = {aug(image(0), np.random.default_rng(s)).tobytes() for s in range(6)}
    assert len(outs) > 1  # it does something


def test_parse_parts_and_config_refuse_unknown_parts():
    assert parse_augment_parts(None) == ((), {}) and parse_augment_parts("robust") == (PARTS, {})
    assert parse_augment_parts("stain, scale") == (("scale", "stain"), {})  # canonical order
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment_parts("scale,zoom")
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainConfig(data="d", out="o", augment_parts=("bogus",))


def test_transforms_do_what_they_say():
    img = image(1)
    assert T.zoom(img, 1.0).tobytes() == img.tobytes()
    for f, fill in ((0.5, "tile"), (0.5, "reflect"), (0.7, "reflect"), (2.0, "tile")):
        out = T.zoom(img, f, fill=fill, offset=(0.3, 0.8))
        assert out.shape == img.shape and out.dtype == np.uint8
    tiled = T.zoom(img, 0.5)
    np.testing.assert_array_equal(tiled[:48, :48], tiled[48:, 48:])  # a wider field of the same smear
    flat = np.full((20, 20, 3), 200, np.uint8)
    np.testing.assert_array_equal(T.hed_to_rgb(T.rgb_to_hed(img)), img)  # colour deconvolution round trip
    np.testing.assert_array_equal(T.hed_jitter(img, np.random.default_rng(0), scale=0, shift=0), img)
    assert T.brightness(flat, 0.5)[0, 0, 0] == 100 and T.gamma(flat, 1.0)[0, 0, 0] == 200
    assert (T.white_balance(flat, (1.1, 1.0, 0.9))[0, 0] == (220, 200, 180)).all()
    erased = T.erase_scalebar(img)
    assert (erased[:80] == img[:80]).all() and len(np.unique(erased[-5:, -5:].reshape(-1, 3), axis=0)) == 1


def test_robust_share_p_picks_which_images_are_shifted():
    base = RobustAugment(parts=()).base
    for seed in range(4):  # p = 0: one draw, then the standard augmentation only
        rng = np.random.default_rng(seed)
        rng.random()
        np.testing.assert_array_equal(RobustAugment(parts=PARTS, p=0.0)(image(seed), np.random.default_rng(seed)),
                                      base(image(seed), rng))
    half = RobustAugment(parts=PARTS, p=0.5)
    for seed in range(4):
        a = half(image(seed), np.random.default_rng(seed))
        assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
        np.testing.assert_array_equal(a, half(image(seed), np.random.default_rng(seed)))
    # p = 1 draws nothing extra: the images of the ablations made before the option existed
    np.testing.assert_array_equal(RobustAugment(parts=PARTS, p=1.0)(image(3), np.random.default_rng(3)),
                                  RobustAugment(parts=PARTS)(image(3), np.random.default_rng(3)))
    with pytest.raises(ValueError, match="p must be in"):
        RobustAugment(parts=PARTS, p=1.5)
    with pytest.raises(ValueError, match="robust_p"):
        TrainConfig(data="d", out="o", robust_p=-0.1)


def test_a_part_can_have_its_own_share():
    text = "scale=1, stain, exposure,degrade=0.25"
    assert parse_augment_parts(text) == (("scale", "stain", "exposure", "degrade"), {"scale": 1.0, "degrade": 0.25})
    for bad in ("scale=2", "scale=x", "scale=-0.1"):
        with pytest.raises(ValueError, match="share must be a number in"):
            parse_augment_parts(bad)
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment_parts("zoom=1")
    # scale at share 1 with p = 0: every image is still zoomed 70 % of the time, never stained
    aug = RobustAugment(parts=("scale", "stain"), p=0.0, part_p={"scale": 1.0})
    only_scale = RobustAugment(parts=("scale",), p=1.0)
    changed = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        rng.random(), rng.random()  # the draw of p, then scale's own
        a = aug(image(seed), np.random.default_rng(seed))
        np.testing.assert_array_equal(a, aug(image(seed), np.random.default_rng(seed)))  # deterministic
        assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
        b = only_scale(image(seed), rng)  # the same draws after p's: zoom then the standard augmentation
        np.testing.assert_array_equal(a, b)
        changed += not np.array_equal(a, RobustAugment(parts=(), p=1.0)(image(seed), np.random.default_rng(seed)))
    assert changed
    with pytest.raises(ValueError, match="part shares"):
        RobustAugment(parts=("scale",), part_p={"stain": 0.5})
    with pytest.raises(ValueError, match="augment_part_p"):
        TrainConfig(data="d", out="o", augment_parts=("scale",), augment_part_p={"scale": 1.5})
    cfg = TrainConfig(data="d", out="o", augment_parts=("scale", "stain"), robust_p=0.5,
                      augment_part_p={"scale": 1})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
