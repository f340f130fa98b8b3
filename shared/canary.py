"""The canary's decision rule: are users less pleased with the canary than with live?

Evidence per arm (live, canary), from users' ratings of answers served since the canary started
(the last rating per rater and answer): n ratings, k of them negative (thumbs down, 1-2 of 5).
The effect is d = k_c/n_c - k_l/n_l, the canary's extra share of negative ratings.

A group-sequential test: at every look (each time new ratings arrive), once both arms hold
`min_ratings`, a Wald interval of d with a strict bound against harm and a plainer one for
promotion, so that looking often keeps both errors small:

    rollback      d - 2.807·se > 0        the canary is worse (one-sided 0.25% per look)
    promote       d + 1.96·se < margin    not worse than live by the margin (2.5% per look)
    inconclusive  neither, once both arms hold `max_ratings` (the horizon): an operator decides
    continue      otherwise

Shares are smoothed by one rating each way ((k+1)/(n+2)) so that an arm with no negative rating
yet still has a spread. Simulated error rates with the defaults (min 100 ratings per arm,
horizon 400, margin 0.10, a look every 10 ratings per arm; tests/test_canary.py, 2,000 runs
each): an equal canary (20% negative in both arms) is promoted in 96.6% of runs and rolled back
in 1.3%; a worse one (35% vs 20%) is promoted in 0.9% and rolled back in 98%; one exactly at the
margin (30% vs 20%) is promoted in 9.5%.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Z_ROLLBACK = 2.807  # one-sided 0.25% per look
Z_PROMOTE = 1.96  # one-sided 2.5% per look
Decision = Literal["promote", "rollback", "inconclusive", "continue"]


@dataclass(frozen=True)
class Arm:
    ratings: int
    negative: int

    @property
    def smoothed_share(self) -> float:
        return (self.negative + 1) / (self.ratings + 2)


@dataclass(frozen=True)
class Evidence:
    live: Arm
    canary: Arm
    diff: float  # canary's negative share - live's
    ci: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    live: Arm, canary: Arm, min_ratings: int, max_ratings: int, margin: float
) -> tuple[Decision, Evidence]:
    pl, pc = live.smoothed_share, canary.smoothed_share
    diff = pc - pl
    spread = math.sqrt(pl * (1 - pl) / (live.ratings + 2) + pc * (1 - pc) / (canary.ratings + 2))
    evidence = Evidence(live, canary, diff, (diff - Z_ROLLBACK * spread, diff + Z_PROMOTE * spread))
    if min(live.ratings, canary.ratings) < min_ratings:
        return "continue", evidence
    if evidence.ci[0] > 0:
        return "rollback", evidence
    if evidence.ci[1] < margin:
        return "promote", evidence
    if min(live.ratings, canary.ratings) >= max_ratings:
        return "inconclusive", evidence
    return "continue", evidence
