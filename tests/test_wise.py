"""`cadbcnn-train wise-ft`: a fine-tune's weights interpolated toward the ONNX file it started from (WiSE-FT)."""

from __future__ import annotations

import pytest
import torch

from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.config import TrainConfig
from cadbcnn_train.model import create_model
from cadbcnn_train.onnx_init import load_onnx_weights
from cadbcnn_train.wise import interpolate_checkpoint, mix_state_dicts
from conftest import make_dataset, save_random_checkpoint

QUIET = dict(log=lambda *a: None)


def test_mix_is_elementwise_and_keeps_integer_buffers():
    start = {"w": torch.zeros(3), "n": torch.tensor(5)}
    tuned = {"w": torch.tensor([2.0, 4.0, -2.0]), "n": torch.tensor(9)}
    for a, want in ((0.0, [0, 0, 0]), (1.0, [2, 4, -2]), (0.25, [0.5, 1.0, -0.5])):
        out = mix_state_dicts(start, tuned, a)
        assert out["w"].tolist() == want and out["n"].item() == 9
    with pytest.raises(ArgumentError, match="differ in architecture"):
        mix_state_dicts({"w": torch.zeros(3)}, {"v": torch.zeros(3)}, 0.5)
    with pytest.raises(ArgumentError, match="shape"):
        mix_state_dicts({"w": torch.zeros(3)}, {"w": torch.zeros(4)}, 0.5)


@pytest.fixture
def fine_tune(onnx_model, tmp_path):
    from cadbcnn_train.train import fit

    data = make_dataset(tmp_path / "data", per_class=10, size=64, classes=("Benign", "Early", "Pre", "Pro"))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cadbcnn", epochs=1, batch_size=8,
                      image_size=64, precision="fp32", threads=2, init=str(onnx_model), freeze="early", lr=1e-2,
                      max_steps=2, bn_recal_images=16, calibrate=False, fit_ood=False)
    fit(cfg, quiet=True)
    return data, tmp_path / "run" / "best.pt"


def test_the_ends_are_the_start_and_the_fine_tune_and_frozen_modules_stay(fine_tune, onnx_model, tmp_path):
    data, ft = fine_tune
    tuned = load_checkpoint(ft).state_dict
    start = create_model("cadbcnn", num_classes=4)
    load_onnx_weights(start, onnx_model)
    trained, frozen_bn = "branch_a.7.0.conv1.weight", "branch_a.4.0.bn1"
    assert not torch.equal(tuned[trained], start.state_dict()[trained])
    ends = {a: load_checkpoint(interpolate_checkpoint(ft, onnx_model, a, data, tmp_path / f"a{a}.pt", images=16,
                                                      **QUIET)) for a in (0.0, 0.5, 1.0)}
    assert torch.equal(ends[0.0].state_dict[trained], start.state_dict()[trained])
    assert torch.equal(ends[1.0].state_dict[trained], tuned[trained])
    torch.testing.assert_close(ends[0.5].state_dict[trained], (tuned[trained] + start.state_dict()[trained]) / 2)
    # θ_start is the fine-tune's own starting point (BatchNorm re-derived on the batches `fit --init` used), so the
    # modules the fine-tune froze come out unchanged at every α, running statistics included.
    for a, ck in ends.items():
        for k in ("weight", "bias", "running_mean", "running_var"):
            torch.testing.assert_close(ck.state_dict[f"{frozen_bn}.{k}"], tuned[f"{frozen_bn}.{k}"], rtol=1e-6,
                                       atol=1e-6, msg=f"α={a}: {frozen_bn}.{k}")
    spec = ends[0.5].spec
    assert spec.adaptation[-1]["step"] == "wise-ft" and spec.adaptation[-1]["alpha"] == 0.5
    assert spec.adaptation[-1]["toward"]["sha256"] == spec.training["init"]["sha256"]
    assert spec.calibration is None and spec.ood is None and spec.metrics is None
    assert spec.weights_sha256 != ends[1.0].spec.weights_sha256


def test_wrong_arguments_are_refused_before_any_work(fine_tune, onnx_model, tmp_path):
    from typer.testing import CliRunner

    from cadbcnn_train.cli import app

    data, ft = fine_tune
    r = CliRunner().invoke(app, ["wise-ft", str(ft), "--toward", str(onnx_model), "--alpha", "1.5", "--data",
                                 str(data), "--out", str(tmp_path / "o.pt")])
    assert r.exit_code == 2 and "[0, 1]" in r.output, r.output
    import onnx

    m = onnx.load(onnx_model)  # the same weights in another file (another sha256): not the fine-tune's start
    m.doc_string = "another file"
    onnx.save(m, other := tmp_path / "other.onnx")
    with pytest.raises(ArgumentError, match="is not the file"):
        interpolate_checkpoint(ft, other, 0.5, data, tmp_path / "o.pt", **QUIET)
    with pytest.raises(ArgumentError, match="new file"):
        interpolate_checkpoint(ft, onnx_model, 0.5, data, ft, **QUIET)
    scratch = save_random_checkpoint(tmp_path / "scratch.pt", image_size=64)
    with pytest.raises(ArgumentError, match="not fine-tuned"):
        interpolate_checkpoint(scratch, onnx_model, 0.5, data, tmp_path / "o.pt", **QUIET)
    assert not (tmp_path / "o.pt").exists()


def test_release_script_wise_step_interpolates_toward_the_recorded_init_and_calibrates(fine_tune, tmp_path):
    """`scripts/release.sh wise RUN ALPHA` (the --init path read from RUN's checkpoint) → RUN-wise05, calibrated,
    evaluated on val and test."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data, ft = fine_tune
    (ft.parent / "release.pt").write_bytes(ft.read_bytes())
    env = {**os.environ, "DATA": str(data), "B": str(Path(sys.executable).parent)}
    r = subprocess.run([str(root / "scripts" / "release.sh"), "wise", str(ft.parent), "0.5"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = ft.parent.parent / "run-wise05"
    ck = load_checkpoint(out / "release.pt")
    assert ck.spec.adaptation[-1]["alpha"] == 0.5 and ck.spec.calibration["temperature"] > 0
    assert (out / "val" / "metrics.json").is_file() and (out / "test" / "metrics.json").is_file()
    assert (out / "split.csv").read_bytes() == (ft.parent / "split.csv").read_bytes()
