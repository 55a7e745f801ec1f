"""Reliability arithmetic (torch-free): silent errors, calibration, risk–coverage, review threshold, temperature."""

import numpy as np
import pytest

from cadbcnn_runtime.reliability import (
    T_MAX,
    T_MIN,
    brier,
    choose_review_threshold,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    risk_coverage,
    silent_error_stats,
    softmax,
)

pytestmark = pytest.mark.runtime


# -- silent errors -------------------------------------------------------------
def test_labelled_silent_errors_by_hand():
    pred = [0, 1, 2, 3, 1, 2, 0, 3]
    truth = [0, 1, 2, 0, 2, 2, 1, 3]   # wrong: images 3, 4, 6
    review = [0, 0, 1, 1, 0, 0, 0, 0]  # image 3 (wrong) is reviewed; 4 and 6 are silent
    s = silent_error_stats(pred, truth, review)
    assert s["n"] == 8 and s["accuracy"] == 5 / 8 and s["review_rate"] == 2 / 8
    assert s["silent_errors"] == 2 and s["silent_error_rate"] == 2 / 8
    assert s["n_non_reviewed"] == 6 and s["accuracy_non_reviewed"] == 4 / 6
    assert s["malignant_rate"] is None and s["ood_rate"] is None and s["labelled"] and not s["healthy"]


def test_healthy_set_counts_malignant_labels_without_review():
    pred = [0, 0, 1, 3, 2, 0]          # malignant: images 2, 3, 4
    review = [True, False, True, False, False, False]
    ood = [True, False, True, False, False, False]
    s = silent_error_stats(pred, None, review, healthy=True, benign_index=0, out_of_distribution=ood)
    assert s["malignant_rate"] == 3 / 6 and s["silent_errors"] == 2 and s["silent_error_rate"] == 2 / 6
    assert s["review_rate"] == 2 / 6 and s["ood_rate"] == 2 / 6
    assert s["accuracy"] is None and s["accuracy_non_reviewed"] is None


def test_healthy_benign_index_is_respected():
    s = silent_error_stats([2, 2, 0], None, [False, False, False], healthy=True, benign_index=2)
    assert s["silent_errors"] == 1 and s["malignant_rate"] == 1 / 3


def test_unlabelled_set_reports_review_and_ood_only():
    s = silent_error_stats([0, 1, 2, 3], None, [True, False, False, True], out_of_distribution=[1, 0, 0, 0])
    assert s["review_rate"] == 0.5 and s["ood_rate"] == 0.25
    assert s["silent_errors"] is None and s["silent_error_rate"] is None and s["accuracy"] is None


def test_everything_reviewed_and_empty_sets():
    s = silent_error_stats([1, 2], [0, 0], [True, True])
    assert s["silent_errors"] == 0 and s["accuracy"] == 0 and s["accuracy_non_reviewed"] is None
    e = silent_error_stats([], [], [])
    assert e["n"] == 0 and e["review_rate"] is None and e["silent_error_rate"] is None


def test_silent_error_input_checks():
    with pytest.raises(ValueError, match="truth=None"):
        silent_error_stats([0], [0], [False], healthy=True)
    with pytest.raises(ValueError, match="needs_review"):
        silent_error_stats([0, 1], [0, 1], [False])


# -- proper scores and calibration ---------------------------------------------
def test_nll_and_brier_by_hand():
    p = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    y = np.array([0, 2])
    assert nll(p, y) == pytest.approx(-(np.log(0.5) + np.log(0.7)) / 2)
    assert brier(p, y) == pytest.approx(((0.25 + 0.25) + (0.01 + 0.04 + 0.09)) / 2)
    assert brier(np.eye(3), [0, 1, 2]) == 0 and brier(np.eye(3), [1, 2, 0]) == pytest.approx(2)
    assert np.isfinite(nll([[1.0, 0.0]], [1]))  # floored, not infinite


def test_ece_is_near_zero_when_calibrated_and_positive_when_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 200_000)
    calibrated = rng.random(conf.size) < conf
    overconfident = rng.random(conf.size) < conf - 0.2
    assert expected_calibration_error(conf, calibrated) < 0.005
    assert expected_calibration_error(conf, overconfident) == pytest.approx(0.2, abs=0.01)


def test_ece_and_bins_by_hand():
    conf = [0.05, 0.15, 0.95, 1.0]
    ok = [True, False, True, False]
    bins = reliability_bins(conf, ok, n_bins=10)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 lands in the last bin
    assert bins[2].acc is None and bins[9].mean_conf == pytest.approx(0.975) and bins[9].acc == 0.5
    expected = (abs(1 - 0.05) + abs(0 - 0.15) + 2 * abs(0.5 - 0.975)) / 4
    assert expected_calibration_error(conf, ok, n_bins=10) == pytest.approx(expected)


# -- risk–coverage -------------------------------------------------------------
def test_risk_coverage_by_hand_with_ties():
    conf = [0.9, 0.8, 0.8, 0.7, 0.6]
    ok = [True, True, False, True, False]
    rc = risk_coverage(conf, ok)
    np.testing.assert_allclose(rc.thresholds, [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(rc.coverage, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(rc.risk, [0, 1 / 3, 1 / 4, 2 / 5])
    # each image weighs 1/N at the risk of the point that first keeps it (the tied pair both at 1/3)
    assert rc.aurc == pytest.approx((0 + 2 * (1 / 3) + 1 / 4 + 2 / 5) / 5)


def test_aurc_without_ties_is_mean_prefix_risk():
    rng = np.random.default_rng(1)
    conf, ok = rng.random(50), rng.random(50) < 0.7
    order = np.argsort(-conf)
    prefix = np.cumsum(~ok[order]) / np.arange(1, 51)
    assert risk_coverage(conf, ok).aurc == pytest.approx(prefix.mean())


# -- review threshold ----------------------------------------------------------
def test_review_threshold_on_a_hand_made_curve():
    # sorted by confidence: 20 right at 0.99..0.80, one wrong at 0.79, 29 right at 0.78..0.50, one wrong at 0.45
    conf = np.r_[np.linspace(0.99, 0.80, 20), 0.79, np.linspace(0.78, 0.50, 29), 0.45]
    ok = np.r_[np.ones(20, bool), False, np.ones(29, bool), False]
    # target 2 %: keeping down to 0.50 is 1 error in 50 = 2 % (allowed); 0.45 would be 2 in 51
    r = choose_review_threshold(conf, ok, target_risk=0.02)
    assert r.achieved and r.threshold == pytest.approx(0.50) and r.n_kept == 50 and r.risk == pytest.approx(0.02)
    assert r.coverage == pytest.approx(50 / 51) and r.n == 51
    # target 1 %: every threshold below 0.79 keeps the error at <= 1/21 ≈ 4.8 % > 1 %; at 0.80 risk is 0
    r = choose_review_threshold(conf, ok, target_risk=0.01)
    assert r.threshold == pytest.approx(0.80) and r.n_kept == 20 and r.risk == 0
    # the same, but demanding half the images be kept: impossible → review everything
    r = choose_review_threshold(conf, ok, target_risk=0.01, min_coverage=0.5)
    assert not r.achieved and r.threshold == 1.0 and r.n_kept == 0 and r.risk is None


def test_review_threshold_all_correct_keeps_everything():
    conf = [0.97, 0.4, 0.66, 0.81]
    r = choose_review_threshold(conf, [True] * 4, target_risk=0.0)
    assert r.achieved and r.threshold == 0.4 and r.coverage == 1.0 and r.risk == 0


def test_review_threshold_none_achieve_returns_one():
    r = choose_review_threshold([0.9, 0.8, 0.7], [False, True, True], target_risk=0.005)
    assert not r.achieved and r.threshold == 1.0 and r.coverage == 0 and r.risk is None
    # saturated softmax: confidence exactly 1.0 stays un-reviewed under `conf < 1.0`; reported as such
    r = choose_review_threshold([1.0, 0.8], [False, True], target_risk=0.005)
    assert not r.achieved and r.threshold == 1.0 and r.n_kept == 1 and r.risk == 1.0


def test_review_threshold_keeps_ties_together():
    # two images at 0.8, one wrong: the threshold cannot sit between them (keeping the right one alone
    # would give 0 %, keeping both gives 1/3 > 30 %)
    for ok in ([True, True, False], [True, False, True]):
        r = choose_review_threshold([0.9, 0.8, 0.8], ok, target_risk=0.3)
        assert r.threshold == 0.9 and r.n_kept == 1
    assert choose_review_threshold([0.9, 0.8, 0.8], [True, True, False], target_risk=0.34).n_kept == 3


# -- temperature ---------------------------------------------------------------
def test_softmax_is_stable_and_tempered():
    p = softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[1, 0], [0.5, 0.5]])
    np.testing.assert_allclose(softmax([[2.0, 0.0]], temperature=2.0), softmax([[1.0, 0.0]]))
    with pytest.raises(ValueError):
        softmax([[1.0, 2.0]], temperature=0)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    rng = np.random.default_rng(42)
    z = rng.normal(0, 3, (5000, 4))
    p = softmax(z, temperature=t_true)
    labels = (rng.random((5000, 1)) > p.cumsum(1)).sum(1)  # one draw from each row's distribution
    t = fit_temperature(z, labels)
    assert t == pytest.approx(t_true, rel=0.10)
    assert fit_temperature(z, labels) == t  # deterministic


def test_fit_temperature_hits_the_bound_on_a_separable_set():
    z = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(z, [0, 1]) == pytest.approx(T_MIN, rel=1e-3)
    assert fit_temperature(z, [1, 0]) == pytest.approx(T_MAX, rel=1e-3)
