"""The learner's recipe: one typed config drives an explicit loop (paper Algorithm 1, fed by the
interaction log instead of a static prompt set).

    for each batch of prompts (batch_completions / G of them):
        rollout   G candidates per prompt, CA system prompt prepended     (vLLM, current adapter)
        reward    the same policy scores each candidate 0-5               (vLLM, greedy|expected)
        update    group advantages → clipped GRPO loss + β·KL to base,    (torch + PEFT)
                  on the prompt WITHOUT the CA system prompt
        sync      save the adapter, load it into vLLM under a new name
        every K steps: checkpoint → candidate version → commit offsets → gate (candidates.py)

What passes between the phases is typed: Completions from the engine (rollout.py), a Trajectory
(trajectory.py) into the update, the Trainer (trainer.py) holding the model and optimiser.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner import checkpoint, drift, metrics
from learner.candidates import CandidatePipeline, crash_point
from learner.consumer import PromptBatch, PromptFilter, PromptSource, TrainingPrompt
from learner.gate import Gate
from learner.rollout import Completion, Engine, InProcessEngine, check_fits
from learner.served import ServedEngine
from learner.trainer import Trainer
from learner.trajectory import Trajectory
from shared.config import DynalignConfig
from shared.files import lock_directory
from shared.lifecycle import Lifecycle

log = logging.getLogger(__name__)

RewardFn = Callable[
    [Sequence[list[dict[str, Any]]], Sequence[Sequence[Completion]]], list[list[float | None]]
]
# (prompt filter, next offset per "topic:partition", deferred prompts) -> where prompts come from
SourceFactory = Callable[[PromptFilter, dict[str, int], list[TrainingPrompt]], PromptSource]


@dataclass
class StepReport:
    step: int
    reward_mean: float
    reward_std: float
    zero_variance_groups: float
    unparsable: int
    kl: float
    loss: float
    grad_norm: float
    completion_tokens: float
    tokens_per_s: float
    seconds: dict[str, float]
    candidate_version: int | None = None


class Learner:
    """A torchtune-style recipe: constructing it only keeps the config; `setup()` loads the
    trainer and engine and picks up where the workdir's last run stopped, `run()` steps,
    `close()` ends the engine. Candidates and their lineage: candidates.py."""

    def __init__(
        self,
        cfg: DynalignConfig,
        workdir: Path,
        source_factory: SourceFactory,
        reward_fn: RewardFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.source_factory = source_factory
        self.reward_fn = reward_fn
        self.step = 0
        self.offsets: dict[str, int] = {}
        self.deferred: list[TrainingPrompt] = []
        self.source: PromptSource | None = None
        self.engine: Engine | None = None

    def setup(self) -> Learner:
        from shared.models import resolve_model_path

        lc = self.cfg.learner
        self._workdir_lock = lock_directory(self.workdir, "the learner workdir")
        torch.manual_seed(lc.seed)
        model_path = resolve_model_path(self.cfg.model)
        self.trainer = Trainer.load(model_path, lc)
        self.lifecycle = Lifecycle.from_config(self.cfg)
        self.lifecycle.reconcile()
        # The serving engines when any are named (`dynalign up`'s own), else one of our own.
        self.engine = (
            ServedEngine(self.cfg, self.workdir / "rollout")
            if lc.rollout_endpoints
            else InProcessEngine(self.cfg.model, lc, self.workdir / "rollout")
        )
        self.reward_fn = self.reward_fn or self.engine.self_scores
        t = self.trainer
        gate = (
            Gate(
                self.cfg.gate,
                self.engine,
                t.model,
                t.layers,
                t.tokenizer,
                self.cfg.learner.micro_batch_completions,
            )
            if self.cfg.gate.enabled
            else None
        )
        self.candidates = CandidatePipeline(
            self.cfg, self.workdir, model_path, t, self.engine, self.lifecycle, gate
        )

        resumed = checkpoint.latest(self.workdir)
        if resumed:
            path, state = resumed
            checkpoint.restore(path, t.model, t.optimizer)
            self.step, self.offsets = state.step, dict(state.next_offsets)
            self.deferred = list(state.deferred)
            log.info(
                "resumed from %s (step %d, offsets %s, %d deferred prompts)",
                path.name,
                self.step,
                self.offsets,
                len(self.deferred),
            )
        prompt_filter = PromptFilter(
            lambda messages: check_fits(t.tokenizer, messages, lc, self.engine.max_model_len),
            lc.dedupe_keys,
            lc.max_user_share,
        )
        self.source = self.source_factory(prompt_filter, self.offsets, self.deferred)
        self.candidates.resume(resumed, self.source, self.offsets)
        return self

    @property
    def model(self):
        return self.trainer.model

    @property
    def parent_version(self) -> int | None:
        return self.candidates.parent_version

    @property
    def prompts_per_step(self) -> int:
        return max(1, self.cfg.learner.batch_completions // self.cfg.learner.group_size)

    def run(
        self,
        max_steps: int | None = None,
        max_idle_polls: int | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Step until `max_steps` (total, across restarts), until the source stays empty for
        `max_idle_polls` polls (None = forever), or until `stop` is set."""
        while (max_steps is None or self.step < max_steps) and not (stop and stop.is_set()):
            report = self.step_once(max_idle_polls)
            if report is None:
                break
            if on_step:
                on_step(report)

    def step_once(self, max_idle_polls: int | None = None) -> StepReport | None:
        t0 = time.perf_counter()
        batch = self.source.next_batch(self.prompts_per_step, max_idle_polls)
        if batch is None:
            return None
        # A pause holds the next batch. In flight is set before the pause check, so whoever
        # paused and then reads 0 knows no step will start.
        try:
            metrics.STEP_IN_FLIGHT.set(1)
            t0 += self._wait_while_paused()  # the batch's time does not count the pause
            return self._step(batch, t0)
        finally:
            metrics.STEP_IN_FLIGHT.set(0)

    def _step(self, batch: PromptBatch, t0: float) -> StepReport:
        conversations = [p.messages for p in batch.prompts]
        t1 = time.perf_counter()
        completions = self.engine.sample(conversations)  # [P][G]
        t2 = time.perf_counter()
        scores = self.reward_fn(conversations, completions)  # [P][G]
        t3 = time.perf_counter()
        trajectory = Trajectory.scored(
            conversations, completions, scores, self.cfg.learner.advantage_std_floor
        )
        stats, input_tokens = self.trainer.update(trajectory)
        self.engine.load_policy(self.trainer.save_adapter)
        t4 = time.perf_counter()

        self.step += 1
        self.offsets.update(batch.next_offsets)
        self.deferred = batch.deferred
        report = self._report(trajectory, stats, input_tokens, [t0, t1, t2, t3, t4])
        self._export(report, trajectory)
        drift.MONITOR.observe_step(
            trajectory.rewards.flatten().tolist(),
            trajectory.lengths,
            report.zero_variance_groups,
            self.parent_version,
        )
        crash_point("mid-step")
        if self.step % self.cfg.learner.checkpoint_every_steps == 0:
            report.candidate_version = self.checkpoint(report)
        return report

    def checkpoint(self, report: StepReport) -> int:
        """This step's candidate version (candidates.py)."""
        step_metrics = {"reward_mean": report.reward_mean, "kl": report.kl, "loss": report.loss}
        return self.candidates.checkpoint(self.step, self.offsets, self.deferred, step_metrics)

    def _report(
        self,
        trajectory: Trajectory,
        stats: dict[str, torch.Tensor],
        input_tokens: int,
        times: list[float],
    ) -> StepReport:
        t0, t1, t2, t3, t4 = times
        scored, lengths = trajectory.scores, trajectory.lengths
        return StepReport(
            step=self.step,
            reward_mean=scored.mean().item() if scored.numel() else float("nan"),
            reward_std=scored.std().item() if scored.numel() > 1 else 0.0,
            zero_variance_groups=trajectory.zero_variance_groups,
            unparsable=trajectory.unparsable,
            kl=float(stats.get("kl", torch.tensor(0.0))),
            loss=float(stats["loss"]),
            grad_norm=float(stats["grad_norm"]),
            completion_tokens=sum(lengths) / len(lengths),
            tokens_per_s=(input_tokens + sum(lengths)) / (t4 - t0),
            seconds={"batch": t1 - t0, "rollout": t2 - t1, "reward": t3 - t2, "update": t4 - t3},
        )

    def _wait_while_paused(self) -> float:
        """Seconds waited on an operator's pause-learning."""
        started = time.perf_counter()
        if self.lifecycle.state().learning_paused:
            log.info("learning paused by an operator; waiting for resume-learning")
            metrics.STEP_IN_FLIGHT.set(0)
            while self.lifecycle.state().learning_paused:
                time.sleep(1.0)  # an operator's flag in a file: nothing to wait on but a poll
            metrics.STEP_IN_FLIGHT.set(1)
        return time.perf_counter() - started

    def _export(self, report: StepReport, trajectory: Trajectory) -> None:
        metrics.STEPS.inc()
        for value in trajectory.scores.tolist():
            metrics.REWARD.observe(value)
        for n in trajectory.lengths:
            metrics.COMPLETION_TOKENS.observe(n)
        metrics.SCORED.inc(trajectory.scores.numel() + report.unparsable)
        metrics.UNPARSABLE_SCORES.inc(report.unparsable)
        metrics.REWARD_MEAN.set(report.reward_mean)
        metrics.REWARD_STD.set(report.reward_std)
        metrics.ZERO_VARIANCE_GROUPS.set(report.zero_variance_groups)
        metrics.KL.set(report.kl)
        metrics.LOSS.set(report.loss)
        metrics.GRAD_NORM.set(report.grad_norm)
        metrics.TOKENS_PER_SECOND.set(report.tokens_per_s)
        metrics.CONSUMER_LAG.set(self.source.lag())
        for phase, seconds in report.seconds.items():
            metrics.STEP_SECONDS.labels(phase).observe(seconds)

    def close(self) -> None:
        """Safe after a setup() that failed part way."""
        try:
            if self.source is not None:
                self.source.close()
        finally:
            if self.engine is not None:
                self.engine.shutdown()  # its engine-core process must not outlive us
