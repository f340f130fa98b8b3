"""The canary's decision rule (shared/canary.py): its stated error rates, simulated."""

from __future__ import annotations

import numpy as np
import pytest

from shared.canary import Arm, decide
from shared.config import GateConfig

RULE = GateConfig()


def simulate(p_live: float, p_canary: float, runs: int = 2000, look_every: int = 10) -> dict:
    """Share of runs ending in each decision when users dislike live's answers with p_live and
    the canary's with p_canary, both arms rated at the same pace."""
    rng = np.random.default_rng(0)
    ends = {"promote": 0, "rollback": 0, "inconclusive": 0}
    for _ in range(runs):
        n = k_live = k_canary = 0
        while True:
            n += look_every
            k_live += rng.binomial(look_every, p_live)
            k_canary += rng.binomial(look_every, p_canary)
            decision, _ = decide(
                Arm(n, k_live),
                Arm(n, k_canary),
                RULE.canary_min_ratings,
                RULE.canary_max_ratings,
                RULE.canary_margin,
            )
            if decision != "continue":
                ends[decision] += 1
                break
    return {k: v / runs for k, v in ends.items()}


def test_the_rules_error_rates_are_as_stated():
    equal = simulate(0.20, 0.20)
    assert equal["promote"] == pytest.approx(0.966, abs=0.01)
    assert equal["rollback"] == pytest.approx(0.013, abs=0.005)
    worse = simulate(0.20, 0.35)
    assert worse["promote"] == pytest.approx(0.009, abs=0.005)
    assert worse["rollback"] == pytest.approx(0.98, abs=0.01)
    at_margin = simulate(0.20, 0.30)
    assert at_margin["promote"] == pytest.approx(0.095, abs=0.015)


def test_no_decision_before_the_minimum_and_inconclusive_at_the_horizon():
    # all-negative canary, all-positive live: clear harm, but too few ratings yet
    assert decide(Arm(10, 0), Arm(10, 10), 100, 400, 0.1)[0] == "continue"
    assert decide(Arm(100, 0), Arm(100, 100), 100, 400, 0.1)[0] == "rollback"
    decision, evidence = decide(Arm(400, 80), Arm(400, 100), 100, 400, 0.1)
    assert decision == "inconclusive" and evidence.ci[0] < 0 < evidence.ci[1]
    assert decide(Arm(300, 80), Arm(300, 100), 100, 400, 0.1)[0] == "continue"
