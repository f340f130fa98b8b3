"""shared/reward.py: reading a score 0-5 out of the judge's reply."""

from __future__ import annotations

import math

import pytest

from shared.prompts import REWARD_PROMPT
from shared.reward import expected_score, parse_score, reward_prompt


@pytest.mark.parametrize(
    "text, score",
    [
        ("Score: 4", 4),
        ("4/5", 4),
        ("I'd give it a 5.", 5),
        ("six", None),
        ("", None),
        ("10", None),
        ("3 or 4", None),
        ("**3**", 3),
        (" 2\n", 2),
        ("0", 0),
        ("4 out of 5", 4),
        ("5/5", 5),
        ("Score: 4\n\nFinal: 4", 4),  # the same score twice is one score
        ("8/10", None),  # another scale: 8 is no score here
        ("4.5", None),
        ("-1", None),
        ("3-4", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_expected_score_weights_digits_and_renormalises():
    lp = {"4": math.log(0.5), "5": math.log(0.25), "Great": math.log(0.2), " 4": math.log(0.05)}
    # digits only: p(4) = 0.55, p(5) = 0.25 -> renormalised over 0.8
    assert expected_score(lp) == pytest.approx((4 * 0.55 + 5 * 0.25) / 0.8)


def test_expected_score_single_digit_and_none():
    assert expected_score({"3": -7.0, "**": -0.01}) == pytest.approx(3.0)
    assert expected_score({"**": -0.1, "The": -2.5}) is None
    assert expected_score({}) is None
    assert expected_score({"2": -math.inf}) is None


def test_expected_score_survives_tiny_probabilities():
    # exp(-800) underflows to 0 in float64; the result must still be the mix of 1 and 2
    assert expected_score({"1": -800.0, "2": -800.0 - math.log(3)}) == pytest.approx(1.25)


def test_reward_prompt_fills_fields_verbatim():
    text = reward_prompt("Plan {a} trip", "Go by {bus}.")
    assert "User's request:\n\nPlan {a} trip\n\nResponse\n\nGo by {bus}.\n" in text
    assert text.startswith(REWARD_PROMPT[:40])
    assert "{prompt}" not in text and "{response}" not in text
