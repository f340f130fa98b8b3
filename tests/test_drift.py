"""The drift math (learner/drift.py) against hand-computed values, and the monitor against the
thresholds of the alert rules that watch it (deploy/prometheus/alerts.yml)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY

from learner import drift
from learner.drift import REWARD_EDGES, DriftMonitor
from tests.conftest import REPO


def alert_threshold(alert: str) -> float:
    """The number in an alert rule of the form `metric > number`."""
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    expr = next(
        rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == alert
    )
    return float(re.fullmatch(r"\s*\w+\s*>\s*([0-9.]+)\s*", expr).group(1))


def gauge(name: str, version: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"adapter_version": version})


# -- pure functions -------------------------------------------------------------------------------
def test_psi_matches_the_formula_with_epsilon_smoothing():
    reference = [0.0] * 50 + [5.0] * 50
    current = [0.0] * 100
    eps = drift.PSI_EPSILON
    r = np.array([0.5, 0, 0, 0, 0, 0.5]) + eps
    c = np.array([1.0, 0, 0, 0, 0, 0]) + eps
    r, c = r / r.sum(), c / c.sum()
    assert drift.psi(reference, current, REWARD_EDGES) == pytest.approx(
        float(np.sum((c - r) * np.log(c / r)))
    )
    assert drift.psi(reference, reference, REWARD_EDGES) == 0


def test_reward_bins_are_the_score_a_reward_rounds_to():
    shares = drift.bin_shares([0, 0.49, 0.5, 1.49, 2, 3, 4, 4.49, 4.5, 5], REWARD_EDGES)
    assert shares.tolist() == [0.2, 0.2, 0.1, 0.1, 0.2, 0.2]


def test_jensen_shannon_is_in_bits_between_0_and_1():
    assert drift.jensen_shannon([1, 2, 3], [1, 2, 3], REWARD_EDGES) == 0
    assert drift.jensen_shannon([0] * 10, [5] * 10, REWARD_EDGES) == 1
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert drift.jensen_shannon([0, 0], [0, 1], REWARD_EDGES) == pytest.approx(expected)
    assert drift.jensen_shannon([0, 0], [0, 1], REWARD_EDGES) == pytest.approx(
        drift.jensen_shannon([0, 1], [0, 0], REWARD_EDGES)
    )


def test_saturation_counts_rewards_that_round_to_5():
    assert drift.saturation([5, 4.6, 4.4, 0]) == 0.5
    assert math.isnan(drift.saturation([]))


def test_spearman_with_ties_and_constants():
    # The textbook example (also scipy.stats.spearmanr's documentation): 0.8207826816681233.
    assert drift.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert drift.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1)
    assert math.isnan(drift.spearman([8, 8, 8], [1, 2, 3]))
    with pytest.raises(ValueError):
        drift.spearman([1, 2], [1])


def test_length_bins_see_growth_and_shrinkage_of_a_single_repeated_length():
    reference = [8] * 64  # every answer cut at max_new_tokens
    edges = drift.length_edges(reference)
    assert drift.psi(reference, [8] * 64, edges) == 0
    assert drift.psi(reference, [5] * 64, edges) > 1
    assert drift.psi(reference, [12] * 64, edges) > 1


def rollouts(rng, n, reward_mean=2.5, length_median=100.0):
    rewards = np.clip(rng.normal(reward_mean, 0.9, n), 0, 5)
    lengths = np.round(rng.lognormal(math.log(length_median), 0.4, n)).astype(int)
    return rewards.tolist(), lengths.tolist()


def feed(monitor: DriftMonitor, rng, version, steps=8, **shift) -> drift.DriftSignals:
    """`steps` learner steps of 32 rollouts (4 prompts x G=8)."""
    for _ in range(steps):
        signals = monitor.observe_step(*rollouts(rng, 32, **shift), 0.25, version)
    return signals


@pytest.mark.parametrize("seed", range(10))
def test_an_unshifted_policy_stays_under_the_alert_thresholds(seed):
    rng = np.random.default_rng(seed)
    monitor = DriftMonitor()
    feed(monitor, rng, None)  # 256 rollouts: the reference
    signals = feed(monitor, rng, 1000 + seed)
    assert signals.reward_psi < alert_threshold("DynalignRewardDrift")
    assert signals.length_psi < alert_threshold("DynalignCompletionLengthDrift")
    assert signals.reward_js_bits < 0.05


def test_a_shifted_reward_distribution_crosses_the_alert_threshold():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor()
    feed(monitor, rng, None)
    signals = feed(monitor, rng, 2001, reward_mean=3.5)
    assert signals.reward_psi > alert_threshold("DynalignRewardDrift")
    assert signals.length_psi < alert_threshold("DynalignCompletionLengthDrift")
    assert gauge("dynalign_learner_drift_reward_psi", "2001") == signals.reward_psi
    assert gauge("dynalign_learner_drift_reward_js_bits", "2001") == signals.reward_js_bits


def test_longer_answers_cross_the_length_alert_threshold():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor()
    feed(monitor, rng, None)
    signals = feed(monitor, rng, 2002, length_median=150.0)
    assert signals.length_psi > alert_threshold("DynalignCompletionLengthDrift")
    assert signals.reward_psi < alert_threshold("DynalignRewardDrift")
    assert signals.length_mean == gauge("dynalign_learner_drift_completion_tokens_mean", "2002")
    assert gauge("dynalign_learner_drift_completion_tokens_p95", "2002") > signals.length_mean


def test_reward_hacking_signals():
    monitor = DriftMonitor(reference_size=16, window_size=16, min_observations=16)
    lengths = list(range(10, 26))
    # Longer answers get higher self-scores, most of them 5s; one candidate unscored.
    rewards = [min(5.0, n / 4) for n in lengths]
    rewards[0] = math.nan
    signals = monitor.observe_step(rewards, lengths, zero_variance_share=0.5, adapter_version=2003)
    assert signals.reward_saturation == pytest.approx(sum(r >= 4.5 for r in rewards[1:]) / 15)
    assert signals.length_reward_spearman > alert_threshold("DynalignRewardTracksLength")
    assert signals.zero_variance_share == 0.5
    assert gauge("dynalign_learner_drift_reward_saturation_ratio", "2003") > alert_threshold(
        "DynalignRewardSaturation"
    )


def test_no_psi_before_the_reference_is_full_and_old_versions_are_dropped():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(reference_size=64, window_size=64, min_observations=32, keep_versions=2)
    signals = monitor.observe_step(*rollouts(rng, 32), 0.0, 3001)
    assert signals.reward_psi is None and signals.length_psi is None
    assert gauge("dynalign_learner_drift_reward_psi", "3001") is None
    assert gauge("dynalign_learner_drift_completion_tokens_mean", "3001") is not None
    monitor.observe_step(*rollouts(rng, 32), 0.0, 3002)
    assert gauge("dynalign_learner_drift_reward_psi", "3002") is not None
    monitor.observe_step(*rollouts(rng, 32), 0.0, 3003)
    assert gauge("dynalign_learner_drift_completion_tokens_mean", "3001") is None
    assert gauge("dynalign_learner_drift_completion_tokens_mean", "3002") is not None
    with pytest.raises(ValueError):
        monitor.observe_step([1.0, 2.0], [3], 0.0, 3003)


def test_an_explicit_reference_replaces_the_first_rollouts():
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(min_observations=32)
    monitor.set_reference(*rollouts(rng, 256, reward_mean=4.0))
    signals = monitor.observe_step(*rollouts(rng, 32), 0.0, 3101)
    assert signals.reward_psi > alert_threshold("DynalignRewardDrift")


def test_record_functions_export_per_version_and_skip_what_was_not_measured():
    drift.record_gate_result(
        4001, score_diff=0.2, probe_kl=0.03, win_rate=0.625, ifeval_accuracy=0.71
    )
    drift.record_gate_result(4002, score_diff=-0.1, probe_kl=0.9)
    assert gauge("dynalign_learner_gate_win_ratio", "4001") == 0.625
    assert gauge("dynalign_learner_gate_score_diff", "4002") == -0.1
    assert gauge("dynalign_learner_probe_kl_nats", "4001") == 0.03
    assert gauge("dynalign_learner_ifeval_canary_accuracy_ratio", "4001") == 0.71
    assert gauge("dynalign_learner_gate_win_ratio", "4002") is None
    assert gauge("dynalign_learner_probe_kl_nats", "4002") > alert_threshold(
        "DynalignProbeKLAboveBound"
    )
