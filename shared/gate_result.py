"""The gate's result on a candidate version, as the learner's gate (learner/gate.py) makes it and
as the registry keeps it (each verdict's audit entry, `RegistryState.gate_results`), the
operator reads it (`dynalign adapters show`, GET /admin/adapters) and the experiment reports it:
one typed record from the judge to the operator."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

GateOutcome = Literal["pass", "reject", "inconclusive"]


class GateResult(BaseModel):
    outcome: GateOutcome
    reasons: list[str]
    probes: int
    # The frozen judge's mean scores and the paired difference with its 95% CI.
    score_candidate: float
    score_live: float
    score_diff: float
    score_diff_ci: tuple[float, float]
    score_margin: float
    # Only with a judge endpoint.
    win_rate: float | None = None
    win_rate_ci: tuple[float | None, float | None] | None = None
    wins: int = 0
    losses: int = 0
    inconsistent: int = 0
    kl: float
    length_ratio: float
    ifeval_candidate: float | None = None
    ifeval_live: float | None = None

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"
