"""The GPU-machine release path (docs/STATUS.md, "GPU sessions"): the data copy that must fit the 64 MiB that travels,
the release rule's pick among seeds, and `scripts/device_release.sh` end to end on the CPU (ALLOW_CPU=1) — a GPU
session has 15 minutes, so the script must not meet its first bug there."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _split(root: Path, out: Path, splits=("train", "train", "val", "test")) -> Path:
    rows = []
    for c in sorted(p.name for p in root.iterdir()):
        for i, f in enumerate(sorted((root / c).iterdir())):
            rows.append({"path": f"{c}/{f.name}", "label": c, "split": splits[i % len(splits)]})
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "split"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return out


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run(root: Path, name: str, f1: float, gate: bool | None) -> Path:
    run = root / name
    for c in ("best", "last"):
        _write(run / f"val-{c}" / "metrics.json", {"accuracy": f1, "f1_macro": f1 if c == "best" else f1 - 0.1})
    if gate is not None:
        _write(run / "ood-gate" / "ood_report.json", {"gate": {"passed": gate, "failed": [] if gate else ["x 0 %"]}})
    return run


def test_pick_is_the_best_on_validation_among_gate_passers(tmp_path):
    rule = _module("release_rule")
    runs = [_run(tmp_path, "s0", 0.95, True), _run(tmp_path, "s1", 0.98, False), _run(tmp_path, "s2", 0.97, True),
            _run(tmp_path, "s3", 0.99, None)]
    (tmp_path / "s4").mkdir()  # never reached the release steps: no part in the choice
    assert rule.pick(runs + [tmp_path / "s4"]) == (runs[2], runs[3])
    assert rule.pick([runs[1]]) == (None, runs[1])
    assert rule.pick([tmp_path / "s4"]) == (None, None)
    cmd = [sys.executable, str(ROOT / "scripts" / "release_rule.py"), "pick"]
    assert subprocess.run(cmd + [str(r) for r in runs], capture_output=True, text=True).stdout.strip() == str(runs[2])
    none = subprocess.run(cmd + [str(runs[1])], capture_output=True, text=True)
    assert none.returncode == 1 and none.stdout == "" and "no candidate passed the OOD gate" in none.stderr
    best = subprocess.run(cmd + ["--best-if-none", str(runs[1])], capture_output=True, text=True)
    assert (best.returncode, best.stdout.strip()) == (3, str(runs[1]))


def test_device_data_copies_train_and_val_only_and_refuses_what_would_not_travel(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=8, size=32, fmt=".jpg")
    split = _split(src, tmp_path / "split.csv")
    out = ROOT / "build" / f"test-device-data-{os.getpid()}"
    script = [sys.executable, str(ROOT / "scripts" / "device_data.py"), str(split), str(src), str(out)]
    try:
        big = subprocess.run(script + ["--limit-mib", "0.01"], capture_output=True, text=True)
        assert big.returncode == 2 and "too large to travel; nothing written" in big.stdout and not out.exists()
        ok = subprocess.run(script + ["--limit-mib", "10000"], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        root = out / "src"  # under the dataset folder's own name, which the spec records
        assert f"scripts/device_release.sh train build/{out.name}/src" in ok.stdout
        rows = list(csv.DictReader(open(root / "split.csv")))
        assert len(rows) == 24 and {r["split"] for r in rows} == {"train", "val"}
        for r in rows:  # the very bytes, under the split's own paths
            assert (root / r["path"]).read_bytes() == (src / r["path"]).read_bytes()
        assert not any((root / c / f"{c}-004.jpg").exists() for c in ("Benign", "Pro"))  # test images stay here
        outside = subprocess.run(script[:-1] + [str(tmp_path / "elsewhere")], capture_output=True, text=True)
        assert outside.returncode == 2 and "outside the checkout" in outside.stdout
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_device_release_trains_gates_picks_and_packs_what_comes_back(tmp_path, onnx_model):
    """One seed, two steps of two epochs on 64-px synthetic images, on the CPU: every stage of the GPU call runs
    (the teacher table, fit distilling it, release.sh post and gate through the script's own command shims, the
    pick, the fp16 parts, the report archive) and `unpack` rebuilds the checkpoint here."""
    src = make_dataset(tmp_path / "src", per_class=20, size=64, fmt=".jpg")
    split = _split(src, tmp_path / "split.csv")
    data = ROOT / "build" / f"test-device-run-{os.getpid()}"
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = dict(os.environ, ALLOW_CPU="1", OUT=str(out), RUNS=str(runs), SEEDS="0", EPOCHS="2", BUDGET="1500",
               POST_S="600", PY=sys.executable, FIT_EXTRA="--image-size 64 --max-steps 2 --bn-recal-images 16",
               TEACHER=str(data / "src" / "teacher.json"))
    try:
        d = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_data.py"), str(split), str(src), str(data),
                            "--limit-mib", "10000", "--teacher", str(onnx_model)], capture_output=True, text=True)
        assert d.returncode == 0 and "teacher: logits of" in d.stdout and "on 40 training images" in d.stdout, d.stdout + d.stderr
        r = subprocess.run([str(ROOT / "scripts" / "device_release.sh"), "train", str(data / "src")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "| 0 | 2 / 2 |" in r.stdout and "| finished | best |" in r.stdout and "| passed |" in r.stdout
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert files == ["parts/manifest.json"] + [f"parts/release.part0{i}" for i in range(4)] + ["reports.tar.gz"]
        assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 64 * 2**20  # what may come back
        with tarfile.open(out / "reports.tar.gz") as t:
            names = set(t.getnames())
            assert {"summary.md", "device.log", "picked", "s0/history.csv", "s0/ood-gate/ood_report.md",
                    "s0/val-best/metrics.json"} <= names
            config = json.load(t.extractfile("s0/config.json"))
        assert config["teacher"] == str(data / "src" / "teacher.json") and config["consistency"] == 1.0
        back = tmp_path / "back"
        u = subprocess.run([str(ROOT / "scripts" / "device_release.sh"), "unpack", str(out), str(back)], cwd=ROOT,
                           env=dict(env, SPLIT=str(split), PY=sys.executable), capture_output=True, text=True)
        assert u.returncode == 0, u.stdout + u.stderr
        assert (back / "s0" / "split.csv").read_bytes() == split.read_bytes()  # the whole split, test rows included
        training = load_checkpoint(back / "s0" / "release.pt").spec.training
        assert training["dataset"] == "src" and training["images"] == 80  # the device's copy held 60
        assert training["split_counts"]["test"] == {n: 5 for n in training["split_counts"]["train"]}
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_device_release_refuses_to_train_without_cuda_unless_asked(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    data = tmp_path / "data"
    data.mkdir()
    (data / "split.csv").write_text("path,label,split\n")
    r = subprocess.run([str(ROOT / "scripts" / "device_release.sh"), "train", str(data)], cwd=ROOT,
                       env=dict(os.environ, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
                                PY=sys.executable), capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA device" in r.stdout and not (tmp_path / "runs" / "s0").exists()
