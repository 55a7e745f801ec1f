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
