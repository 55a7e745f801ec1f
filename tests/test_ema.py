import pytest
import torch
from torch import nn

from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.ema import WeightEma
from cadbcnn_train.train import fit
from conftest import make_dataset
from test_train import small_cfg


def test_weight_ema_is_the_ramped_exponential_average_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEma(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    expected = w0.clone()
    for n in range(30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.fill_(float(n))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model[0].weight.detach()
        ema.update(model)
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-5)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # it lags the live weights
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers copied, not averaged
    assert ema.state() == {"decay": 0.9, "updates": 30}
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_ema_decay_outside_the_open_interval_is_refused(tmp_path, decay):
    with pytest.raises(ArgumentError, match="ema must be 0"):
        small_cfg(tmp_path, tmp_path / "run", ema=decay)


def test_fit_with_ema_keeps_the_average_and_resumes_it(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8, size=32)
    run = tmp_path / "run"
    fit(small_cfg(data, run, epochs=1, max_steps=2, ema=0.99), quiet=True)
    last = load_checkpoint(run / "last.pt")
    assert last.raw["ema"] == {"decay": 0.99, "updates": 2}
    live, avg = last.raw["train_state_dict"], last.state_dict
    assert any(not torch.equal(live[k], avg[k]) for k in avg if k.endswith("weight"))  # the model is the average
    fit(small_cfg(data, run, epochs=2, max_steps=2, ema=0.99), resume=True, quiet=True)
    last = load_checkpoint(run / "last.pt")
    assert last.raw["ema"]["updates"] == 4 and last.epoch == 1
    best = load_checkpoint(run / "best.pt")  # the saved best is an average too (never the live weights)
    assert best.spec.weights_sha256


def test_cli_refuses_a_decay_of_one_before_any_work(tmp_path):
    from typer.testing import CliRunner
    from cadbcnn_train.cli import app
    data = make_dataset(tmp_path / "d", per_class=2, size=32)
    r = CliRunner().invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "run"), "--ema", "1"])
    assert r.exit_code == 2 and "ema must be 0" in r.output
    assert not (tmp_path / "run").exists()
