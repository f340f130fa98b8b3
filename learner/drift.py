"""Drift and reward-hacking signals of the learner's policy, exported per adapter version.

A self-rewarding learner can drift in ways its loss never shows: the policy learns to give
itself 5s (saturation), groups stop carrying any GRPO signal (zero variance), answers grow
because longer ones score higher (length-reward correlation), or the reward distribution moves
away from where training started. `DriftMonitor` compares a recent window of rollouts with a
reference window (the first rollouts it saw, or one set explicitly) and sets the gauges in
learner/metrics.py; the `record_*` functions export what other parts measure per version (the
gate's win rate and probe-set KL, the IFEval canary, an external judge's audit).

Plain numpy: PSI and Jensen-Shannon over fixed bins and a rank correlation need nothing more
(scipy is not a dependency of dynalign).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge

from learner import metrics

# Reward bins: the integer score a reward rounds to (0..5). Greedy rewards are integers, expected
# rewards are probability-weighted means; both land in the bin of their nearest score.
REWARD_EDGES = np.array([0.5, 1.5, 2.5, 3.5, 4.5])
SATURATED_REWARD = 4.5  # rounds to 5
# Added to every bin's share before PSI's log ratio, so an empty bin costs a large but finite
# amount instead of infinity.
PSI_EPSILON = 1e-4


def version_label(version: int | None) -> str:
    """The `adapter_version` label value, as the server writes it."""
    return "base" if version is None else str(version)


# -- pure functions -------------------------------------------------------------------------------
def bin_shares(values: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Share of `values` in each of the len(edges)+1 bins (-inf, e0), [e0, e1), ..., [ek, inf)."""
    values = np.asarray(values, dtype=float)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def psi(
    reference: Sequence[float],
    current: Sequence[float],
    edges: np.ndarray,
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population stability index, sum (c - r) ln(c / r) over the bins, with epsilon smoothing.
    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a real shift."""
    r = bin_shares(reference, edges) + epsilon
    c = bin_shares(current, edges) + epsilon
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def jensen_shannon(
    reference: Sequence[float], current: Sequence[float], edges: np.ndarray
) -> float:
    """Jensen-Shannon divergence in bits (base 2), so 0 (same) .. 1 (disjoint)."""
    p, q = bin_shares(reference, edges), bin_shares(current, edges)
    m = (p + q) / 2

    def kl_to_m(x: np.ndarray) -> float:
        nonzero = x > 0  # 0 log 0 = 0; m > 0 wherever x > 0
        return float(np.sum(x[nonzero] * np.log2(x[nonzero] / m[nonzero])))

    return min(1.0, max(0.0, (kl_to_m(p) + kl_to_m(q)) / 2))


def saturation(rewards: Sequence[float]) -> float:
    """Share of rewards that round to 5."""
    rewards = np.asarray(rewards, dtype=float)
    return float(np.mean(rewards >= SATURATED_REWARD)) if len(rewards) else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, tie_group, tie_size = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / tie_size)[tie_group]  # ties share the mean


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x) - (len(x) + 1) / 2, _average_ranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denominator) if denominator else math.nan


def length_edges(reference_lengths: Sequence[int]) -> np.ndarray:
    """Bins for token counts at the reference's quintiles. Where the shortest or longest
    reference length sits on an edge (a mass of answers cut at max_new_tokens, or a reference of
    one repeated length), a half-token edge beside it gives answers that shrink or grow past it
    a bin of their own; otherwise no outer bin, as a sample's extremes would only add noise."""
    ref = np.asarray(reference_lengths, dtype=float)
    edges = np.unique(np.quantile(ref, [0.2, 0.4, 0.6, 0.8]))
    if ref.min() == edges[0]:
        edges = np.concatenate([[edges[0] - 0.5], edges])
    if ref.max() == edges[-1]:
        edges = np.concatenate([edges, [edges[-1] + 0.5]])
    return edges


# -- per-version gauges ---------------------------------------------------------------------------
class VersionedGauges:
    """Gauges labelled by adapter_version; only the newest `keep` versions keep their series,
    so a learner that runs for months does not grow the scrape without bound."""

    def __init__(self, gauges: Sequence[Gauge], keep: int) -> None:
        self.gauges = list(gauges)
        self.keep = keep
        self.versions: list[str] = []

    def set(self, version: int | None, values: dict[Gauge, float | None]) -> None:
        label = version_label(version)
        if label not in self.versions:
            self.versions.append(label)
            for old in self.versions[: -self.keep]:
                for gauge in self.gauges:
                    try:
                        gauge.remove(old)
                    except KeyError:  # that version never had this gauge set
                        pass
            del self.versions[: -self.keep]
        for gauge, value in values.items():
            if value is not None:  # None: not measured (yet); leave the series as it is
                gauge.labels(label).set(value)


@dataclass(frozen=True)
class DriftSignals:
    """The recent window against the reference; None where the reference is not full yet or the
    window holds too few rollouts."""

    reward_psi: float | None
    reward_js_bits: float | None
    reward_saturation: float
    zero_variance_share: float
    length_mean: float
    length_p95: float
    length_psi: float | None
    length_reward_spearman: float


class DriftMonitor:
    """Reference window: the first `reference_size` rollouts observed (or `set_reference`).
    Recent window: the last `window_size` rollouts, labelled with the version of the newest
    step; a version's series keeps the values it had when the next version took over."""

    def __init__(
        self,
        reference_size: int = 256,
        window_size: int = 256,
        min_observations: int = 64,
        keep_versions: int = 5,
    ) -> None:
        # With 256 rollouts on each side, PSI between two samples of one distribution stays
        # under ~0.13 (99th percentile), well below the 0.25 alert threshold; windows with
        # fewer than `min_observations` rollouts give no PSI/JS at all.
        self.reference_size = reference_size
        self.min_observations = min_observations
        self.reference_rewards: list[float] = []
        self.reference_lengths: list[int] = []
        self._length_edges: np.ndarray | None = None
        # (reward or NaN if unscored, length, zero-variance share of its step) per rollout
        self.window: deque[tuple[float, int, float]] = deque(maxlen=window_size)
        self.gauges = VersionedGauges(
            [
                metrics.DRIFT_REWARD_PSI,
                metrics.DRIFT_REWARD_JS,
                metrics.DRIFT_REWARD_SATURATION,
                metrics.DRIFT_ZERO_VARIANCE_GROUPS,
                metrics.DRIFT_COMPLETION_TOKENS_MEAN,
                metrics.DRIFT_COMPLETION_TOKENS_P95,
                metrics.DRIFT_COMPLETION_TOKENS_PSI,
                metrics.DRIFT_LENGTH_REWARD_SPEARMAN,
            ],
            keep_versions,
        )

    @property
    def reference_ready(self) -> bool:
        return self._length_edges is not None

    def set_reference(self, rewards: Sequence[float], lengths: Sequence[int]) -> None:
        """Use a given reference (e.g. rollouts of the live version) instead of the first ones."""
        self.reference_rewards = [r for r in rewards if not math.isnan(r)]
        self.reference_lengths = list(lengths)
        self._length_edges = length_edges(self.reference_lengths)

    def observe_step(
        self,
        rewards: Sequence[float],
        lengths: Sequence[int],
        zero_variance_share: float,
        adapter_version: int | None,
    ) -> DriftSignals:
        """One learner step: every rollout's self-reward (NaN where it could not be scored) and
        token count, in the same order; the step's share of zero-variance groups; the version
        the policy descends from (None = base)."""
        if len(rewards) != len(lengths):
            raise ValueError(f"observe_step: {len(rewards)} rewards vs {len(lengths)} lengths")
        for reward, length in zip(rewards, lengths, strict=True):
            if not self.reference_ready:
                self.reference_lengths.append(length)
                if not math.isnan(reward):
                    self.reference_rewards.append(reward)
                if len(self.reference_lengths) >= self.reference_size:
                    self._length_edges = length_edges(self.reference_lengths)
            self.window.append((float(reward), int(length), float(zero_variance_share)))
        signals = self.signals()
        self.gauges.set(
            adapter_version,
            {
                metrics.DRIFT_REWARD_PSI: signals.reward_psi,
                metrics.DRIFT_REWARD_JS: signals.reward_js_bits,
                metrics.DRIFT_REWARD_SATURATION: signals.reward_saturation,
                metrics.DRIFT_ZERO_VARIANCE_GROUPS: signals.zero_variance_share,
                metrics.DRIFT_COMPLETION_TOKENS_MEAN: signals.length_mean,
                metrics.DRIFT_COMPLETION_TOKENS_P95: signals.length_p95,
                metrics.DRIFT_COMPLETION_TOKENS_PSI: signals.length_psi,
                metrics.DRIFT_LENGTH_REWARD_SPEARMAN: signals.length_reward_spearman,
            },
        )
        return signals

    def signals(self) -> DriftSignals:
        if not self.window:
            raise ValueError("no rollouts observed yet")
        rewards, lengths, zero_variance = (
            np.array(column, dtype=float) for column in zip(*self.window, strict=True)
        )
        scored = ~np.isnan(rewards)
        length_comparable = self.reference_ready and len(lengths) >= self.min_observations
        reward_comparable = (
            self.reference_ready
            and len(self.reference_rewards) > 0
            and scored.sum() >= self.min_observations
        )
        return DriftSignals(
            reward_psi=psi(self.reference_rewards, rewards[scored], REWARD_EDGES)
            if reward_comparable
            else None,
            reward_js_bits=jensen_shannon(self.reference_rewards, rewards[scored], REWARD_EDGES)
            if reward_comparable
            else None,
            reward_saturation=saturation(rewards[scored]),
            zero_variance_share=float(zero_variance.mean()),
            length_mean=float(lengths.mean()),
            length_p95=float(np.percentile(lengths, 95)),
            length_psi=psi(self.reference_lengths, lengths, self._length_edges)
            if length_comparable
            else None,
            length_reward_spearman=spearman(lengths[scored], rewards[scored]),
        )


# The learner's monitor: Learner.step_once feeds it after every step.
MONITOR = DriftMonitor()

_EVALUATIONS = VersionedGauges(
    [
        metrics.PROBE_KL,
        metrics.GATE_SCORE_DIFF,
        metrics.GATE_WIN_RATIO,
        metrics.IFEVAL_CANARY_ACCURACY,
    ],
    keep=5,
)


def record_gate_result(
    version: int | None,
    score_diff: float | None,
    probe_kl: float | None,
    win_rate: float | None = None,
    ifeval_accuracy: float | None = None,
) -> None:
    """The gate's measurements of a version: the frozen judge's mean score difference against
    live on the probe prompts, the mean per-token KL to the base there (nats), the pairwise win
    rate against live (with a judge endpoint, and some judgement consistent), and the IFEval
    canary's prompt-level strict accuracy when the canary ran."""
    _EVALUATIONS.set(
        version,
        {
            metrics.GATE_SCORE_DIFF: score_diff,
            metrics.GATE_WIN_RATIO: win_rate,
            metrics.PROBE_KL: probe_kl,
            metrics.IFEVAL_CANARY_ACCURACY: ifeval_accuracy,
        },
    )
