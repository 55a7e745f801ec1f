import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score
from typer.testing import CliRunner

from cadbcnn_runtime.errors import ArgumentError, CheckpointError
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.cli import app
from cadbcnn_train.config import TrainConfig
from cadbcnn_train.env import DistInfo
from cadbcnn_train.metrics import compute_metrics
from cadbcnn_train.train import fit
from conftest import make_dataset

runner = CliRunner()


def small_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="resnet18", epochs=2, batch_size=8, image_size=32, lr=1e-3,
                warmup_epochs=0.2,
                precision="fp32", seed=0, threads=2)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_separable_classes_and_writes_everything(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=30, size=32)
    res = fit(small_cfg(data, tmp_path / "run"), quiet=True)
    out = tmp_path / "run"
    for f in ("best.pt", "last.pt", "config.json", "split.csv", "history.csv", "curves.png", "metrics.json",
              "metrics.md", "confusion_matrix.png", "summary.json"):
        assert (out / f).is_file(), f
    assert res.test_metrics["accuracy"] >= 0.9
    ck = load_checkpoint(out / "best.pt")
    assert ck.spec.metrics["accuracy"] == res.test_metrics["accuracy"]
    assert ck.spec.weights_sha256 and ck.split_hash and ck.class_folders == ("Benign", "Early", "Pre", "Pro")
    assert json.loads((out / "config.json").read_text())["model"] == "resnet18"
    assert (out / "history.csv").read_text().count("\n") == 3


def test_checkpoint_round_trip_reproduces_logits_exactly(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    fit(small_cfg(data, tmp_path / "run", model="cadbcnn", epochs=1, max_steps=2), quiet=True)
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    m1, m2 = ck.build_model(), load_checkpoint(tmp_path / "run" / "best.pt").build_model()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
    assert ck.spec.image_size == (32, 32) and ck.model_name == "cadbcnn"


def test_resume_continues_from_last(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2), quiet=True)
    res = fit(small_cfg(data, tmp_path / "run", epochs=3, max_steps=2), resume=True, quiet=True)
    hist = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["1", "2", "3"]
    assert res.epochs_run == 3
    assert load_checkpoint(tmp_path / "run" / "last.pt").epoch == 2



def test_resume_refuses_other_training_options_before_any_work(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    run = tmp_path / "run"
    fit(small_cfg(data, run, epochs=1, max_steps=2), quiet=True)
    before = {f: (run / f).read_bytes() for f in ("last.pt", "history.csv", "config.json", "split.csv")}
    with pytest.raises(ArgumentError, match=r"last\.pt: --resume with other training options.*lr: run 0\.001, "
                                            r"now 0\.01.*new --out"):
        fit(small_cfg(data, run, epochs=3, max_steps=2, lr=1e-2), resume=True, quiet=True)
    with pytest.raises(ArgumentError, match=r"augment_parts: run \[\], now \['stain'\]"):
        fit(small_cfg(data, run, epochs=3, max_steps=2, augment_parts=("stain",)), resume=True, quiet=True)
    assert {f: (run / f).read_bytes() for f in before} == before  # nothing of the interrupted run was touched


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_refuses_another_split_and_keeps_the_runs_own(tmp_path, monkeypatch, rank):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    run = tmp_path / "run"
    fit(small_cfg(data, run, epochs=1, max_steps=2), quiet=True)
    files = sorted(p.name for p in run.iterdir())
    # under DDP every rank must refuse by itself: a rank that went on would wait forever at the first collective
    monkeypatch.setattr("cadbcnn_train.train.setup_distributed", lambda _: DistInfo(rank=rank, world=2))
    own = (run / "split.csv").read_text()
    header, *body = own.splitlines()
    col = header.split(",").index("split")
    flipped = [r.split(",") for r in body]  # the same images, one train and one val image swapped
    a = next(c for c in flipped if c[col] == "train")
    b = next(c for c in flipped if c[col] == "val")
    a[col], b[col] = "val", "train"
    other = tmp_path / "other.csv"
    other.write_text("\n".join([header] + [",".join(c) for c in flipped]) + "\n")
    with pytest.raises(ArgumentError, match=r"another split.*--split-file .*split\.csv"):
        fit(small_cfg(data, run, epochs=2, max_steps=2, split_file=str(other)), resume=True, quiet=True)
    assert (run / "split.csv").read_text() == own and sorted(p.name for p in run.iterdir()) == files


def test_resume_mismatch_ignores_where_and_how_long():
    from cadbcnn_train.config import RESUME_FREE, resume_mismatch

    cfg = TrainConfig(data="d", out="o")
    stored = {**cfg.to_dict(), "data": "elsewhere", "out": "moved", "epochs": 5, "workers": 3}
    assert {"data", "out", "epochs", "workers"} <= RESUME_FREE and resume_mismatch(stored, cfg) == {}
    assert resume_mismatch({**stored, "seed": 1, "ratios": [0.8, 0.1, 0.1]}, cfg) == {
        "seed": (1, 0), "ratios": ([0.8, 0.1, 0.1], [0.7, 0.15, 0.15])}


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    m = compute_metrics(y, p, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert m["precision_macro"] == pytest.approx(precision_score(y, p, average="macro"))
    assert m["per_class"]["c"]["recall"] == pytest.approx(recall_score(y, p, average=None)[2])
    assert np.array(m["confusion_matrix"]).sum() == 200
    assert np.trace(np.array(m["confusion_matrix"])) == (y == p).sum()


def test_cli_fit_and_evaluate(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    out = tmp_path / "run"
    r = runner.invoke(app, ["fit", "--data", str(data), "--out", str(out), "--model", "resnet18", "--epochs", "1",
                            "--image-size", "32", "--batch-size", "8", "--precision", "fp32", "--max-per-class", "6"])
    assert r.exit_code == 0, r.output
    assert "val_acc" in r.output
    assert (out / "split.csv").read_text().count("\n") == 1 + 24
    r = runner.invoke(app, ["evaluate", str(out / "best.pt"), "--data", str(data), "--split", "val",
                            "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["split"] == "val" and m["n"] == sum(1 for l in (out / "split.csv").read_text().splitlines() if l.endswith(",val"))
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    r = runner.invoke(app, ["evaluate", str(out / "best.pt"), "--data", str(data), "--split", "val",
                            "--out", str(tmp_path / "eval"), "--store"])
    assert r.exit_code == 0 and load_checkpoint(out / "best.pt").spec.metrics["accuracy"] == m["accuracy"]


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["fit", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no class folders" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["evaluate", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "cannot be read as a cadbcnn checkpoint" in r.output
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cadbcnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_pretrained_flag_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    data = make_dataset(tmp_path / "d", per_class=4, size=32)
    r = runner.invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "o"), "--pretrained", "imagenet",
                            "--image-size", "32", "--epochs", "1"])
    assert r.exit_code == 2 and "ImageNet weights" in r.output


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from cadbcnn_train.config import TrainConfig
        from cadbcnn_train import train
        cfg = TrainConfig(data={str(data)!r}, out={str(tmp_path / 'run')!r}, model="resnet18", epochs=1,
                          batch_size=4, image_size=32, precision="fp32", max_steps=2, threads=1)
        captured = {{}}
        orig = train.create_model
        def spy(*a, **k):
            captured["m"] = orig(*a, **k)
            return captured["m"]
        train.create_model = spy
        torch.manual_seed(0)
        init = {{k: v.clone() for k, v in orig("resnet18", num_classes=4).named_parameters()}}
        train.fit(cfg, quiet=True)
        params = dict(captured["m"].named_parameters())
        assert any(not torch.equal(init[k], params[k]) for k in init), "no parameter moved"
        torch.save({{k: v.detach() for k, v in params.items()}}, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # Both ranks trained (parameters moved) and hold identical parameters; rank 0 alone wrote the run files.
    # (BatchNorm running stats are per-rank between DDP's buffer broadcasts; rank 0's are saved.)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "best.pt").is_file()


def test_recalibrate_bn_restores_statistics_of_clean_images():
    from torch.utils.data import DataLoader, TensorDataset

    from cadbcnn_train.model import create_model
    from cadbcnn_train.train import recalibrate_bn

    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=4).eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    bn = m.net.bn1
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(100.0)
    n = recalibrate_bn(m, DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=8), torch.device("cpu"))
    assert n == 16 and not m.training and bn.momentum == 0.1
    with torch.no_grad():
        pre = m.net.conv1(m.normalize(x))
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_recalibrate_bn_keeps_the_statistics_of_frozen_modules():
    from torch.utils.data import DataLoader, TensorDataset

    from cadbcnn_train.model import create_model
    from cadbcnn_train.train import recalibrate_bn

    torch.manual_seed(0)
    m = create_model("cadbcnn", num_classes=4).train()
    m.branch_a[1].running_mean.fill_(5.0)
    m.branch_b[1].running_mean.fill_(5.0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    recalibrate_bn(m, DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=4), torch.device("cpu"),
                   keep=["branch_a.1"])
    assert torch.all(m.branch_a[1].running_mean == 5.0) and not torch.all(m.branch_b[1].running_mean == 5.0)
    assert m.training and m.branch_a[1].training  # every module's mode as it was


def test_cli_recalibrate_bn(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2, bn_recal_images=0), quiet=True)
    r = runner.invoke(app, ["recalibrate-bn", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                            "--out", str(tmp_path / "re.pt"), "--images", "16"])
    assert r.exit_code == 0, r.output
    a, b = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "re.pt")
    assert b.raw["bn_recalibrated_on"] == 16 and b.spec.weights_sha256 != a.spec.weights_sha256
    assert torch.equal(a.state_dict["net.conv1.weight"], b.state_dict["net.conv1.weight"])
    assert not torch.equal(a.state_dict["net.bn1.running_mean"], b.state_dict["net.bn1.running_mean"])


def test_recalibrate_bn_leaves_no_stale_derived_fields(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    fit(small_cfg(data, tmp_path / "run", epochs=1, max_steps=2, bn_recal_images=0), quiet=True)
    a = load_checkpoint(tmp_path / "run" / "best.pt")
    assert a.ood and a.spec.ood and a.spec.metrics is not None  # fit made all three on the old weights
    r = runner.invoke(app, ["recalibrate-bn", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                            "--out", str(tmp_path / "re.pt"), "--images", "16"])
    assert r.exit_code == 0 and "OOD statistics" in r.output and "`cadbcnn-train fit-ood`" in r.output, r.output
    b = load_checkpoint(tmp_path / "re.pt")
    assert b.ood is None and b.spec.ood is None and b.metrics is None and b.spec.metrics is None
    assert b.spec.calibration is None and b.spec.quality == a.spec.quality  # input-only check kept


def test_runtime_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    from cadbcnn_runtime.reliability import macro_f1

    rng = np.random.default_rng(3)
    for n in (2, 4, 5):
        y, p = rng.integers(0, n, 200), rng.integers(0, n - 1, 200)  # one class never predicted
        assert abs(macro_f1(y, p, n) - f1_score(y, p, average="macro", labels=range(n), zero_division=0)) < 1e-12
