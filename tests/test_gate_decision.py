"""The gate's decision rule (learner/gate.py) and its error rates, simulated: per-probe score
differences (candidate - live) drawn around a true difference, weighed as the gate weighs them."""

import numpy as np
import pytest

from learner.gate import score_outcome
from shared.config import GateConfig
from shared.judge import bootstrap_mean_ci

# The per-probe spread of frozen-judge score differences assumed here (0-5 scale). Measured on
# SmolLM2 (issue 12: a trained LoRA against base, 95% CI +-0.038 over 40 prompts) it is about
# 0.12; 0.3 leaves room.
SPREAD = 0.3


def outcome_rates(true_diff: float, trials: int = 300, seed: int = 0) -> dict[str, float]:
    cfg = GateConfig()
    rng = np.random.default_rng(seed)
    counts = {"pass": 0, "reject": 0, "inconclusive": 0}
    for trial in range(trials):
        diffs = rng.normal(true_diff, SPREAD, cfg.probe_limit)
        _, low, high = bootstrap_mean_ci(diffs, n_resamples=1000, seed=trial)
        counts[score_outcome(low, high, cfg.score_margin)] += 1
    return {k: v / trials for k, v in counts.items()}


def test_the_rule_has_three_outcomes():
    assert score_outcome(-0.1, 0.2, margin=0.15) == "pass"
    assert score_outcome(-0.6, -0.2, margin=0.15) == "reject"
    assert score_outcome(-0.3, 0.0, margin=0.15) == "inconclusive"


def test_bootstrap_ci_is_the_normal_one_for_normal_data():
    x = np.random.default_rng(1).normal(0.2, SPREAD, 400)
    mean, low, high = bootstrap_mean_ci(x, n_resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert mean == pytest.approx(x.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


@pytest.mark.parametrize(
    "true_diff, at_least, at_most",
    [
        # An equal candidate passes nearly always and is never rejected ...
        (0.0, {"pass": 0.85}, {"reject": 0.0}),
        # ... a clearly worse one (half a point) is always rejected ...
        (-0.5, {"reject": 0.99}, {"pass": 0.0}),
        # ... and one worse by exactly the margin is mostly left to an operator, seldom passed.
        (-GateConfig().score_margin, {"inconclusive": 0.8}, {"pass": 0.05}),
    ],
)
def test_error_rates_at_the_default_probe_count_and_margin(true_diff, at_least, at_most):
    rates = outcome_rates(true_diff)
    assert all(rates[k] >= v for k, v in at_least.items()), rates
    assert all(rates[k] <= v for k, v in at_most.items()), rates
