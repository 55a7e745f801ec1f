"""Review rules fitted on one report's per-image predictions and scored on another's (hand-made predictions)."""

import csv
import json

import numpy as np
import pytest

from cadbcnn_runtime.errors import DatasetError
from cadbcnn_train import review_rules as R
from cadbcnn_train.shift_report import PREDICTION_COLUMNS

NAMES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")


def row(set_, severity, truth, label, conf, *, ood=False, low=False, healthy=False, review=None, image=0):
    p = [(1 - conf) / 3] * 4
    p[NAMES.index(label)] = conf
    return {"set": set_, "kind": severity, "severity": severity, "image": image, "truth": truth or "",
            "healthy": int(healthy), "label": label, "confidence": conf, "ood_score": 0.5,
            "out_of_distribution": int(ood), "low_content": int(low),
            "needs_review": int(review if review is not None else (ood or low or conf < 0.9)),
            **{f"p_{n}": v for n, v in zip(NAMES, p)}}


def write(folder, rows, threshold=0.9, calibration=None):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [*PREDICTION_COLUMNS, *(f"p_{n}" for n in NAMES)])
        w.writeheader()
        w.writerows(rows)
    (folder / "shift_report.json").write_text(json.dumps({"review_threshold": threshold, "class_names": NAMES,
                                                          "calibration": calibration}))
    return folder


def validation_rows():
    """Clean: 100 correct images, conf 0.95–0.999 (every class). Shift 'bright': 40 images whose errors are all
    labelled Pro-B at conf 0.93, while correct Pro-B labels sit at 0.99 and the other classes' at 0.92; one more
    wrong image at 0.999 is OOD-flagged (never kept, so it must not move any threshold). Shift 'blur': 40 correct
    images at 0.91."""
    rows = [row("clean val split", "clean", NAMES[i % 4], NAMES[i % 4], 0.95 + 0.049 * i / 99) for i in range(100)]
    for i in range(40):
        truth = NAMES[i % 3]  # Benign, Early, Pre
        if i < 8:
            rows.append(row("bright", "strong", truth, "Pro-B", 0.93))
        else:
            rows.append(row("bright", "strong", truth, truth, 0.92))
    rows += [row("bright", "strong", "Pro-B", "Pro-B", 0.99) for _ in range(10)]
    rows.append(row("bright", "strong", "Benign", "Pro-B", 0.999, ood=True))
    rows += [row("blur", "mild", NAMES[i % 4], NAMES[i % 4], 0.91) for i in range(40)]
    return rows


def test_read_gives_arrays_in_class_order(tmp_path):
    p = R.Predictions.read(write(tmp_path / "v", validation_rows()))
    assert p.class_names == NAMES and len(p.confidence) == 191
    assert p.truth[0] == 0 and p.label[100] == 3 and p.flagged.sum() == 1
    with pytest.raises(DatasetError, match="--predictions"):
        R.Predictions.read(tmp_path / "nowhere")


def test_rules_on_concentrated_errors(tmp_path):
    val = R.Predictions.read(write(tmp_path / "v", validation_rows()))
    rules = R.fit_rules(val, spec_threshold=0.9)
    clean_t = rules["clean"][0]
    assert clean_t == pytest.approx(0.95) and np.all(rules["clean"] == clean_t)  # all clean correct: lowest conf
    # pooled shifted: 8 errors at 0.93 among 90 kept; ≤ 2 % needs the cut above 0.93 → 0.99, then the clean one
    assert np.all(rules["pooled"] == pytest.approx(0.99))
    assert np.all(rules["per-shift"] == pytest.approx(0.99))  # 'bright' sets it; 'blur' alone would allow 0.91
    # per class: only Pro-B labels are ever wrong, so only Pro-B pays; the others keep their clean thresholds
    pc = rules["per-class"]
    assert pc[3] == pytest.approx(0.99) and np.all(pc[:3] < 0.99)
    np.testing.assert_allclose(pc[:3], clean_t)  # never below the clean floor (shifted alone would allow 0.91)
    # each shift: 'bright' has 8 wrong Pro-B labels at 0.93 among 51 images (budget 2 % = 1), but the clean floor
    # (0.95) reviews them already — the pooled per-class rule counts them as kept and raises Pro-B for nothing
    np.testing.assert_allclose(rules["each-shift"], clean_t)


def test_review_and_score_arithmetic(tmp_path):
    test = R.Predictions.read(write(tmp_path / "t", [
        row("clean test split", "clean", "Benign", "Benign", 0.97),
        row("clean test split", "clean", "Pre-B", "Early Pre-B", 0.96),    # wrong, kept by 0.95: silent
        row("bright", "strong", "Benign", "Pro-B", 0.98),                  # wrong: Pro-B needs 0.99 → reviewed
        row("bright", "strong", "Pre-B", "Pre-B", 0.96),
        row("bright", "strong", "Early Pre-B", "Benign", 0.97),            # wrong, Benign label kept: silent
        row("blank", "blank", None, "Pro-B", 0.999, healthy=True, low=True),  # flagged: never silent
        row("blank", "blank", None, "Pre-B", 0.999, healthy=True),           # malignant, kept: silent
    ]))
    t = np.array([0.95, 0.95, 0.95, 0.99])
    np.testing.assert_array_equal(R.review(test, t), [False, False, True, False, False, True, False])
    s = R.score(test, t, benign_index=0)
    assert s["sets"]["clean test split"]["silent_errors"] == 1 and s["sets"]["clean test split"]["accuracy"] == 0.5
    assert s["sets"]["bright"]["silent_errors"] == 1 and s["sets"]["bright"]["review_rate"] == pytest.approx(1 / 3)
    assert s["sets"]["blank"]["silent_errors"] == 1 and s["sets"]["blank"]["healthy"]
    assert s["groups"]["strong"] == {"n": 3, "review_rate": pytest.approx(1 / 3),
                                     "silent_error_rate": pytest.approx(1 / 3), "over_2pct": 1,
                                     "worst": pytest.approx(1 / 3)}


def test_compare_checks_the_spec_rule_against_the_runtime_and_writes_tables(tmp_path, capsys):
    val = write(tmp_path / "v", validation_rows())
    rows = validation_rows()
    for r in rows:
        r["set"] = r["set"].replace("val", "test")
    rows[0]["needs_review"] = 1  # a runtime flag the spec's threshold does not explain
    test = write(tmp_path / "t", rows)
    assert R.main([str(val), str(test), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "review_rules.json").read_text())
    assert result["spec_disagrees_with_runtime"] == 1 and list(result["rules"]) == list(R.RULES)
    # scored on the images it was fitted on, every fitted rule meets its targets
    for name in ("pooled", "per-shift", "per-class", "each-shift"):
        g = result["rules"][name]["groups"]
        assert g["strong"]["silent_error_rate"] <= 0.02 and g["mild"]["silent_error_rate"] <= 0.02
        assert g["strong"]["worst"] <= 0.02 and g["mild"]["worst"] <= 0.02
    clean = {name: result["rules"][name]["sets"]["clean test split"]["review_rate"] for name in R.RULES}
    assert clean["per-class"] < clean["pooled"]  # only Pro-B labels pay for the shift's Pro-B errors
    md = (tmp_path / "out" / "review_rules.md").read_text()
    assert "| per-class |" in md and "| bright |" in md and md in capsys.readouterr().out


def test_bad_arguments_are_refused(tmp_path):
    val = write(tmp_path / "v", validation_rows())
    with pytest.raises(SystemExit):
        R.main([str(val), str(val), "--out", str(tmp_path / "o"), "--shifted-risk", "2"])
    assert not (tmp_path / "o").exists()
    only_clean = write(tmp_path / "c", [r for r in validation_rows() if r["severity"] == "clean"])
    with pytest.raises(DatasetError, match="shifted sets"):
        R.fit_rules(R.Predictions.read(only_clean), spec_threshold=0.9)


def test_the_spec_rule_reads_per_class_thresholds_from_the_report(tmp_path):
    """A model with calibration.class_review: the 'spec' rule is its per-class thresholds, so it still reproduces
    the runtime's flags."""
    rows = validation_rows()
    per_class = {"class_review": {"thresholds": {"Pro-B": 0.995}}}
    for r in rows:
        r["needs_review"] = int(r["out_of_distribution"] or r["low_content"]
                                or r["confidence"] < (0.995 if r["label"] == "Pro-B" else 0.9))
    val = write(tmp_path / "v", rows)
    test = write(tmp_path / "t", rows, calibration=per_class)
    assert R.spec_thresholds_of(test) == [0.9, 0.9, 0.9, 0.995]
    assert R.main([str(val), str(test), "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "review_rules.json").read_text())
    assert result["spec_disagrees_with_runtime"] == 0 and result["rules"]["spec"]["thresholds"][3] == 0.995
