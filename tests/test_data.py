import shutil
from collections import Counter

import pytest

from cadbcnn_runtime.errors import DatasetError
from cadbcnn_train import data as D
from conftest import make_dataset


def test_known_class_order_and_display_names(dataset):
    folders, names, samples = D.scan(dataset)
    assert folders == ("Benign", "Early", "Pre", "Pro")
    assert names == ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert len(samples) == 48


def test_other_datasets_fall_back_to_folder_names(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("cats", "dogs"), per_class=3)
    folders, names, _ = D.scan(root)
    assert folders == names == ("cats", "dogs")


def test_stratified_split_ratios(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=40, size=16)
    ds = D.load(root)
    split = D.make_split(ds.samples, ratios=(0.7, 0.15, 0.15), seed=3)
    for label in range(4):
        c = Counter(a for s, a in zip(ds.samples, split) if s.label == label)
        assert c["train"] == 28 and c["val"] == 6 and c["test"] == 6


def test_duplicates_never_straddle_splits(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=30, size=16)
    pro = sorted((root / "Pro").iterdir())
    for i in range(0, 20, 2):  # 10 duplicate pairs under other names
        shutil.copy(pro[i], root / "Pro" / f"dup-{i:03d}.png")
    ds = D.load(root)
    for seed in range(5):
        split = D.make_split(ds.samples, seed=seed)
        by_hash = {}
        for s, a in zip(ds.samples, split):
            by_hash.setdefault(s.digest, set()).add(a)
        assert all(len(v) == 1 for v in by_hash.values())
        assert sum(len(v) == 1 for v in by_hash.values()) == len(by_hash)


def test_grouped_split_keeps_file_number_blocks_together(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=60, size=16)
    ds = D.load(root)
    split = D.make_split(ds.samples, mode="grouped", block_size=10, seed=1)
    blocks = {}
    for s, a in zip(ds.samples, split):
        key = (s.label, D._file_number(s.path) // 10)
        blocks.setdefault(key, set()).add(a)
    assert all(len(v) == 1 for v in blocks.values())
    assert set(split) == {"train", "val", "test"}


def test_split_csv_round_trip(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=10, size=16)
    ds = D.load(root)
    split = D.make_split(ds.samples, seed=0)
    h = D.write_split_csv(tmp_path / "split.csv", root, ds.samples, split, ds.class_folders)
    assert h == D.split_hash(tmp_path / "split.csv")
    assert D.read_split_csv(tmp_path / "split.csv", root, ds.samples, ds.class_folders) == split
    header = (tmp_path / "split.csv").read_text().splitlines()[0]
    assert header == "path,label,split"


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        D.load(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        D.load(tmp_path / "missing")


def test_single_class_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("Benign",), per_class=3)
    with pytest.raises(DatasetError, match="only one class"):
        D.load(root)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4, size=16)
    (root / "Pre" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "Pre" / "empty.png").write_bytes(b"")
    ds = D.load(root)
    assert len(ds.samples) == 16
    assert sorted(p.rsplit("/", 1)[1] for p, _ in ds.skipped) == ["broken.jpg", "empty.png"]
    assert all(reason for _, reason in ds.skipped)
