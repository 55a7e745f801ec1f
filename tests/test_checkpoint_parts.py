"""scripts/checkpoint_parts.py: a checkpoint through the GPU machine's capped returned files and back."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cadbcnn_runtime.errors import CheckpointError
from cadbcnn_train.checkpoint import load_checkpoint, save_checkpoint
from conftest import save_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("checkpoint_parts", ROOT / "scripts" / "checkpoint_parts.py")
parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parts)


def test_pack_and_unpack_round_trip_in_fp16_parts(tmp_path):
    src = save_random_checkpoint(tmp_path / "best.pt", model="resnet18", image_size=32)
    ck = load_checkpoint(src)
    save_checkpoint(tmp_path / "resume.pt", model=ck.build_model(), model_name=ck.model_name, model_kwargs={},
                    spec=ck.spec, class_folders=ck.class_folders, config={}, split_hash=None, epoch=3,
                    extra={"optimizer": {"state": torch.zeros(10)}})  # resume state: not brought back
    m = parts.pack(tmp_path / "resume.pt", tmp_path / "out", part_mib=8)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(m["parts"]) == 3 and files == ["manifest.json", "resume.part00", "resume.part01", "resume.part02"]
    assert all(p["bytes"] <= 8 * 2**20 for p in m["parts"]) and m["dropped"] == ["optimizer"]
    parts.unpack(tmp_path / "out", tmp_path / "back.pt")
    back = load_checkpoint(tmp_path / "back.pt")
    assert back.epoch == 3 and back.spec == ck.spec and "optimizer" not in back.raw
    for k, v in ck.state_dict.items():
        w = back.state_dict[k]
        assert w.dtype == v.dtype and torch.equal(w, v.half().float() if v.is_floating_point() else v), k


def test_pack_refuses_what_would_not_come_back_and_unpack_a_damaged_part(tmp_path):
    src = save_random_checkpoint(tmp_path / "best.pt", model="resnet18", image_size=32)
    with pytest.raises(CheckpointError, match="Nothing written"):
        parts.pack(src, tmp_path / "small", part_mib=4, max_parts=3)
    assert not (tmp_path / "small").exists()
    parts.pack(src, tmp_path / "out", part_mib=16)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    p = tmp_path / "out" / m["parts"][0]["name"]
    p.write_bytes(p.read_bytes()[:-1] + b"x")
    assert parts.main(["unpack", str(tmp_path / "out"), str(tmp_path / "back.pt")]) == 2
    assert not (tmp_path / "back.pt").exists()


def test_unpack_gives_the_spec_the_whole_split_back(tmp_path):
    """The device's copy held no test images, so its fit counted none; the whole split restores them, and a split
    whose training or validation counts differ from the trained ones is refused."""
    src = save_random_checkpoint(tmp_path / "best.pt", model="resnet18", image_size=32)
    ck = load_checkpoint(src)
    folders, names = list(ck.class_folders), list(ck.spec.class_names)
    trained = {"train": {n: 3 for n in names}, "val": {n: 1 for n in names}, "test": {n: 0 for n in names}}
    save_checkpoint(tmp_path / "device.pt", model=ck.build_model(), model_name=ck.model_name, model_kwargs={},
                    spec=ck.spec.replace(training={**ck.spec.training, "split_counts": trained}),
                    class_folders=ck.class_folders, config={}, split_hash=None, epoch=1)
    parts.pack(tmp_path / "device.pt", tmp_path / "out")
    rows = ["path,label,split"] + [f"{f}/{f}-{i}.jpg,{f},{s}" for f in folders
                                   for i, s in enumerate(["train"] * 3 + ["val"] + ["test"] * 2)]
    whole = tmp_path / "split.csv"
    whole.write_text("\n".join(rows) + "\n")
    parts.unpack(tmp_path / "out", tmp_path / "back.pt", split_csv=whole)
    training = load_checkpoint(tmp_path / "back.pt").spec.training
    assert training["split_counts"] == {**trained, "test": {n: 2 for n in names}}
    assert training["images"] == 6 * len(names)
    other = tmp_path / "other.csv"
    other.write_text("\n".join(rows[:-2] + [rows[-1].replace(",test", ",val")]) + "\n")
    with pytest.raises(CheckpointError, match="its val counts .* differ from the trained ones"):
        parts.unpack(tmp_path / "out", tmp_path / "back2.pt", split_csv=other)
    assert not (tmp_path / "back2.pt").exists()
