"""The reward's pure parts: the judge prompt, and turning a judge's reply into a score 0-5.

The learner's judge is the policy itself (paper, Table 5); evaluation's is a frozen model.
Two readings (LearnerConfig.reward_mode): "greedy" parses the generated text with
`parse_score`; "expected" takes the probability-weighted mean digit from the top-k log-probs of
the score token with `expected_score`. None means unparsable: the candidate gets no advantage
and stays out of its group's statistics.
"""

from __future__ import annotations

import math
import re

from shared.prompts import REWARD_PROMPT

_DIGITS = frozenset("012345")

# "/5" or "out of 5" after a score is the scale, not a second score ("4/5", "4 out of 5").
_DENOMINATOR = re.compile(r"(?:/|\bout\s+of)\s*5\b", re.IGNORECASE)
# A signed number, decimals included, so "-1" and "4.5" are seen (and rejected) whole.
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reward_prompt(prompt_text: str, response_text: str, template: str = REWARD_PROMPT) -> str:
    # str.format reads braces in the template only, so braces in user text are safe.
    return template.format(prompt=prompt_text, response=response_text)


def parse_score(text: str) -> int | None:
    """The score in a judge's reply, or None.

    Rule: after dropping "/5" and "out of 5" denominators, every number written in digits must
    be the same integer in 0..5. So "Score: 4", "**3**", "4/5", "I'd give it a 5." parse;
    "3 or 4" (two scores), "10", "4.5", "-1" (not a score) and "six" (no digits) do not."""
    numbers = set(_NUMBER.findall(_DENOMINATOR.sub(" ", text)))
    if len(numbers) != 1:
        return None
    (number,) = numbers
    return int(number) if number in _DIGITS else None


def expected_score(logprobs: dict[str, float]) -> float | None:
    """sum_d d * p(d) over the digits 0..5, p renormalised over those six.

    `logprobs` maps top-k tokens at the score position to their log-probs; a digit may come as
    several tokens (" 4" and "4"), which add up, and a digit missing from the top-k counts as
    probability 0. None when no digit is present (or all have probability 0)."""
    digits = [(int(t.strip()), lp) for t, lp in logprobs.items() if t.strip() in _DIGITS]
    digits = [(d, lp) for d, lp in digits if lp > -math.inf]
    if not digits:
        return None
    top = max(lp for _, lp in digits)  # subtract the max so exp cannot underflow to all-zero
    weights = [(d, math.exp(lp - top)) for d, lp in digits]
    return sum(d * w for d, w in weights) / sum(w for _, w in weights)
