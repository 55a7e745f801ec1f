"""Bring a trained checkpoint back from the lent GPU machine, whose returned files are capped (docs/STATUS.md,
"GPU sessions": at most 8 files of 16 MiB, 64 MiB in all; a CADBCNN state dict is 133 MB in fp32):

    python scripts/checkpoint_parts.py pack runs/v0.2.0/s0/best.pt $OUT            # on the device
    python scripts/checkpoint_parts.py unpack DIR runs/v0.2.0/s0/best.pt            # here, from the returned files

``pack`` writes the checkpoint with its weights (floating-point tensors of the state dict) in **fp16**, in parts of
at most ``--part-mib`` MiB, and a manifest with the sha256 of every part and of the whole. It drops what must be
recomputed anyway once the weights are rounded, and what would not fit: resume state, and the OOD statistics. The
spec's OOD entry goes with them, so run ``fit-ood`` after precise BN. It refuses before writing anything when the
parts would exceed ``--max-parts`` or ``--max-mib`` in all.

The released files store their weights as FP16, so the rounding costs nothing the released format keeps.

``unpack`` checks every sha256, joins the parts and writes a normal checkpoint with the weights back in fp32
(``load_checkpoint`` reads it). Then run ``recalibrate-bn``, ``fit-ood``, ``calibrate`` and the release gates here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import torch

from cadbcnn_runtime.atomic import write_atomic
from cadbcnn_runtime.errors import CheckpointError, DatasetError
from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_train.checkpoint import load_checkpoint, weights_sha256

KEEP = ("format", "format_version", "model_name", "model_kwargs", "class_folders", "spec", "state_dict", "config",
        "split_hash", "epoch", "metrics")
MANIFEST = "manifest.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(checkpoint: Path, out: Path, *, part_mib: float = 16.0, max_parts: int = 7, max_mib: float = 64.0) -> dict:
    """Parts and manifest of CHECKPOINT's fp16 weights in OUT; returns the manifest."""
    ck = load_checkpoint(checkpoint)
    raw = {k: ck.raw[k] for k in KEEP if k in ck.raw}
    dropped = sorted(k for k in set(ck.raw) - set(raw) if ck.raw[k] is not None) + (["spec.ood"] if ck.spec.ood else [])
    raw["spec"] = ck.spec.replace(ood=None).to_dict()
    raw["ood"] = None
    raw["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in ck.state_dict.items()}
    buf = io.BytesIO()
    torch.save(raw, buf)
    data = buf.getvalue()
    size = int(part_mib * 2**20)
    n = -(-len(data) // size)
    if n > max_parts or len(data) + 4096 > max_mib * 2**20:
        raise CheckpointError(f"{checkpoint}: {len(data) / 2**20:.1f} MiB in fp16 needs {n} parts of {part_mib:g} MiB; "
                              f"the limit is {max_parts} parts and {max_mib:g} MiB in all. Nothing written.")
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(checkpoint).stem
    parts = []
    for i in range(n):
        chunk = data[i * size:(i + 1) * size]
        name = f"{stem}.part{i:02d}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": _sha(chunk)})
    manifest = {"source": str(checkpoint), "bytes": len(data), "sha256": _sha(data), "parts": parts,
                "weights": "fp16", "fp16_weights_sha256": weights_sha256(raw["state_dict"]), "dropped": dropped,
                "then": "unpack, recalibrate-bn, fit-ood, calibrate, the release gates"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def whole_split_counts(raw: dict, split_csv: Path) -> dict:
    """The spec's ``training.split_counts`` for the whole split SPLIT_CSV (test rows included), checked against what the
    device recorded: its copy held the training and validation images only, so it counted no test images. The
    training and validation counts must be equal, else SPLIT_CSV is not the split it trained on."""
    from collections import Counter

    from cadbcnn_train.data import split_rows

    name_of = dict(zip(raw["class_folders"], raw["spec"]["class_names"]))
    rows = split_rows(split_csv)
    unknown = sorted({r["label"] for r in rows} - set(name_of))
    if unknown:
        raise CheckpointError(f"{split_csv}: labels {unknown} are not the model's class folders {list(name_of)}")
    got = Counter((r["split"], name_of[r["label"]]) for r in rows)
    counts = {split: {c: got[(split, c)] for c in raw["spec"]["class_names"]} for split in ("train", "val", "test")}
    recorded = raw["spec"].get("training", {}).get("split_counts") or {}
    for split in ("train", "val"):
        if dict(recorded.get(split, {})) != counts[split]:
            raise CheckpointError(f"{split_csv}: its {split} counts {counts[split]} differ from the trained ones "
                                  f"{recorded.get(split)}; pass the split the device run was copied from")
    return counts


def unpack(folder: Path, dest: Path, *, split_csv: Path | None = None) -> dict:
    """The checkpoint of FOLDER's parts (checked against its manifest) at DEST, weights in fp32. With SPLIT_CSV, the
    spec's split counts and image count become that whole split's (``whole_split_counts``)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest; pass the folder `checkpoint_parts.py pack` wrote")
    m = json.loads(path.read_text())
    chunks = []
    for p in m["parts"]:
        f = folder / p["name"]
        data = f.read_bytes() if f.is_file() else b""
        if _sha(data) != p["sha256"]:
            raise CheckpointError(f"{f}: missing or damaged (sha256 differs from the manifest); copy it again")
        chunks.append(data)
    data = b"".join(chunks)
    if _sha(data) != m["sha256"]:
        raise CheckpointError(f"{folder}: the joined parts differ from the manifest's whole; copy them again")
    raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    raw["state_dict"] = {k: (v.float() if v.is_floating_point() else v) for k, v in raw["state_dict"].items()}
    if split_csv is not None:
        counts = whole_split_counts(raw, split_csv)
        raw["spec"]["training"]["split_counts"] = counts
        raw["spec"]["training"]["images"] = sum(sum(c.values()) for c in counts.values())
    ModelSpec.from_dict(raw["spec"], source=str(path))  # refused before anything is written
    out = io.BytesIO()
    torch.save(raw, out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, out.getvalue())
    load_checkpoint(dest)  # reads as any checkpoint
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part-mib", type=float, default=16.0)
    p.add_argument("--max-parts", type=int, default=7, help="8 files come back; one is the manifest")
    p.add_argument("--max-mib", type=float, default=64.0)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("dest", type=Path)
    u.add_argument("--split-file", type=Path, default=None,
                   help="the whole split.csv the device's copy was made from: the spec's split counts become its "
                        "(test included); train and validation counts must match the trained ones")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "pack":
            m = pack(a.checkpoint, a.out, part_mib=a.part_mib, max_parts=a.max_parts, max_mib=a.max_mib)
            print(f"{len(m['parts'])} parts, {m['bytes'] / 2**20:.1f} MiB (fp16 weights; dropped: "
                  f"{', '.join(m['dropped']) or 'nothing'}) → {a.out}")
        else:
            m = unpack(a.folder, a.dest, split_csv=a.split_file)
            print(f"{a.dest}: {len(m['parts'])} parts checked and joined; weights back in fp32 (fp16-rounded). "
                  f"Next: {m['then']}")
    except (CheckpointError, DatasetError) as exc:  # DatasetError: the --split-file is missing or not a split
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
