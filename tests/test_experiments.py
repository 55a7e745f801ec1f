"""scripts/experiments.py report: the seed table, mean ± sd, the choice on validation, and the kept reading."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(acc: float, f1: float, n: int = 400) -> dict:
    return {"n": n, "accuracy": acc, "precision_macro": f1, "recall_macro": f1, "f1_macro": f1,
            "f1_weighted": f1}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def _release_run(root: Path, seed: int, val_best: float, val_last: float, test_acc: float) -> Path:
    run = root / f"release-s{seed}"
    _write(run / "config.json", {"seed": seed, "model": "cadbcnn", "split": "stratified"})
    _write(run / "history.csv", "epoch,train_loss,train_acc,val_loss,val_acc,val_f1_macro,lr,seconds,images_per_s\n"
                                "1,1,0.5,1,0.5,0.50,0.001,100,20\n2,1,0.9,1,0.9,0.90,0.001,110,20\n"
                                "3,1,0.9,1,0.9,0.80,0.001,120,20\n")
    _write(run / "summary.json", {"best_val_f1_macro": 0.9, "best_epoch": 2})
    _write(run / "val-best" / "metrics.json", _metrics(val_best, val_best))
    _write(run / "val-last" / "metrics.json", _metrics(val_last, val_last))
    _write(run / "test" / "metrics.json", _metrics(test_acc, test_acc))
    return run


def test_release_seed_table(tmp_path, experiments):
    runs = [_release_run(tmp_path, 0, 0.95, 0.97, 0.99), _release_run(tmp_path, 1, 0.98, 0.96, 0.975),
            _release_run(tmp_path, 2, 0.90, 0.91, 0.98)]
    (tmp_path / "release-s3").mkdir()  # unfinished run (no test metrics): left out
    text = "\n".join(experiments.release_seeds(runs + [tmp_path / "release-s3"]))
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert rows[0].startswith("| 0 | last | 97.00 | 97.00 | 99.00 |")
    assert rows[1].startswith("| 1 | best (epoch 2) | 98.00 | 98.00 | 97.50 |")  # the fit's kept epoch (summary.json)
    assert "| 4 / 400 | 3 | 330 | not run |" in rows[0]  # errors, epochs, summed epoch seconds, OOD gate
    assert "test accuracy 98.17 ± 0.76 %" in text
    assert "Best on validation: seed 1" in text  # seed 1 has the best validation F1, not the best test score
    assert "No candidate has passed the OOD gate yet." in text


def test_release_rule_skips_candidates_that_fail_the_ood_gate(tmp_path, experiments):
    runs = [_release_run(tmp_path, 0, 0.95, 0.96, 0.99), _release_run(tmp_path, 1, 0.98, 0.96, 0.975),
            _release_run(tmp_path, 2, 0.90, 0.91, 0.98)]
    gate = {0: {"passed": True, "failed": []}, 1: {"passed": False, "failed": ["non-blood: uniform noise 0.0 %"]},
            2: {"passed": True, "failed": []}}
    for seed, g in gate.items():
        _write(runs[seed] / "ood-gate" / "ood_report.json", {"gate": {"min_foreign_flagged": 0.9, **g}})
    text = "\n".join(experiments.release_seeds(runs))
    assert "| failed: non-blood: uniform noise 0.0 % |" in text
    assert "Best on validation: seed 1" in text
    assert "Released by that rule: seed 0" in text  # seed 1 fails the gate; seed 0 beats seed 2 on validation


def test_report_keeps_reading_and_cached_costs(tmp_path, experiments):
    out = tmp_path / "exp"
    run = out / "resnet18"
    _write(run / "metrics.json", _metrics(0.9, 0.88))
    _write(run / "config.json", {"model": "resnet18", "split": "stratified", "seed": 0})
    _write(run / "history.csv", "epoch,train_loss,train_acc,val_loss,val_acc,val_f1_macro,lr,seconds,images_per_s\n1,1,1,1,1,1,1,42,1\n")
    costs = {"params_m": 11.2, "gflops": 3.63, "ort_ms": 13.5}
    _write(out / "experiments.json", {"resnet18": {"config": {"model": "resnet18"}, "costs": costs}})
    md = tmp_path / "EXPERIMENTS.md"
    md.write_text(f"old table\n{experiments.READING_MARKER}\n\n## Reading\n\nhand-written text\n")
    args = argparse.Namespace(out=str(out), md=str(md), remeasure=False,
                              release_runs=[str(_release_run(tmp_path, 0, 0.9, 0.9, 0.9))])
    experiments.report(args)
    text = md.read_text()
    assert "old table" not in text
    assert text.endswith("## Reading\n\nhand-written text\n")
    assert text.count(experiments.READING_MARKER) == 1
    assert "| resnet18 | resnet18 | stratified | 90.00 |" in text and "| 13.5 | 42 |" in text  # cached, not measured
    assert text.index("full protocol") < text.index("reduced protocol") < text.index(experiments.READING_MARKER)
