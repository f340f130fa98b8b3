"""The learner's recipe: one typed config drives an explicit loop (paper Algorithm 1, fed by the
interaction log instead of a static prompt set).

    for each batch of prompts (batch_completions / G of them):
        rollout   G candidates per prompt, CA system prompt prepended     (vLLM, current adapter)
        reward    the same policy scores each candidate 0-5               (vLLM, greedy|expected)
        update    group advantages → clipped GRPO loss + β·KL to base,    (torch + PEFT)
                  on the prompt WITHOUT the CA system prompt
        sync      save the adapter, load it into vLLM under a new name
        every K steps: checkpoint → candidate adapter version → commit Kafka offsets
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner import checkpoint, drift, metrics
from learner.checkpoint import CheckpointState
from learner.consumer import PromptBatch, PromptFilter, PromptSource, TrainingPrompt
from learner.gate import Gate
from learner.grpo import collate, group_advantages, micro_batches, training_inputs
from learner.policy import apply_lora, grpo_step, lora_layers, make_optimizer
from learner.rollout import Completion, Engine, InProcessEngine, check_fits
from learner.served import ServedEngine
from shared.config import DynalignConfig
from shared.files import atomic_write, lock_directory
from shared.lifecycle import Lifecycle
from shared.process import return_freed_memory
from shared.registry import WEIGHTS, base_fingerprint, verify_adapter

log = logging.getLogger(__name__)

RewardFn = Callable[
    [Sequence[list[dict[str, Any]]], Sequence[Sequence[Completion]]], list[list[float | None]]
]
# (prompt filter, next offset per "topic:partition", deferred prompts) -> where prompts come from
SourceFactory = Callable[[PromptFilter, dict[str, int], list[TrainingPrompt]], PromptSource]

# Test hook: SIGKILL ourselves at a named point, to prove crash safety where it is hardest.
CRASH_POINT_ENV = "DYNALIGN_LEARNER_CRASH_AT"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == name:
        log.warning("crash point %s: SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)


def run_id(workdir: Path) -> str:
    """This workdir's run id, made on first use and kept in the workdir: the first half of every
    version lineage it publishes."""
    path = workdir / "run_id"
    if not path.exists():
        atomic_write(path, uuid.uuid4().hex[:12].encode())
    return path.read_text().strip()


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
    models and engine and picks up where the workdir's last run stopped, `run()` steps, `close()`
    ends the engine. The lineage rules:
      - versions are published under "<run id>/step-N"; the run id is made once per workdir, so
        a fresh workdir never mistakes an old run's version for its own checkpoint;
      - a fresh workdir starts from `live` (what users are served);
      - when the version a checkpoint became is rejected (by the gate or an operator), training
        continues from `live`, now and after any restart: the registry's verdict is the durable
        record of it, read at every setup."""

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
        self.parent_version: int | None = None
        self.offsets: dict[str, int] = {}
        self.deferred: list[TrainingPrompt] = []
        self.source: PromptSource | None = None
        self.engine: Engine | None = None

    def setup(self) -> Learner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from shared.engine import resolve_model_path

        lc = self.cfg.learner
        self._workdir_lock = lock_directory(self.workdir, "the learner workdir")
        torch.manual_seed(lc.seed)
        self.model_path = resolve_model_path(self.cfg.model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        dtype = torch.bfloat16 if lc.train_dtype == "bfloat16" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model = apply_lora(base.to(self.device), lc)
        self.layers = lora_layers(self.model)
        self.optimizer = make_optimizer(self.model, lc)
        self.lifecycle = Lifecycle.from_config(self.cfg)
        self.lifecycle.reconcile()
        self.run_id = run_id(self.workdir)
        self.fingerprint = base_fingerprint(self.model_path)
        # The serving engines when any are named (`dynalign up`'s own), else one of our own.
        self.engine = (
            ServedEngine(self.cfg, self.workdir / "rollout")
            if lc.rollout_endpoints
            else InProcessEngine(self.cfg.model, lc, self.workdir / "rollout")
        )
        self.reward_fn = self.reward_fn or self.engine.self_scores
        self.gate = (
            Gate(self.cfg.gate, self.engine, self.model, self.layers, self.tokenizer)
            if self.cfg.gate.enabled
            else None
        )

        resumed = checkpoint.latest(self.workdir)
        if resumed:
            path, state = resumed
            checkpoint.restore(path, self.model, self.optimizer)
            self.step, self.offsets = state.step, dict(state.next_offsets)
            self.deferred = list(state.deferred)
            log.info(
                "resumed from %s (step %d, offsets %s, %d deferred prompts)",
                path.name,
                self.step,
                self.offsets,
                len(self.deferred),
            )
        self.checkpoint_offsets = dict(self.offsets)
        prompt_filter = PromptFilter(
            lambda messages: check_fits(self.tokenizer, messages, lc, self.engine.max_model_len),
            lc.dedupe_keys,
            lc.max_user_share,
        )
        self.source = self.source_factory(prompt_filter, self.offsets, self.deferred)
        if resumed:
            # A crash may have come between checkpoint and publish, publish and commit, or
            # commit and the gate's verdict: redo whatever is missing.
            self.parent_version = self._publish(*resumed)
            self.source.commit(resumed[1].next_offsets)
            self._judge(self.parent_version)
        else:
            self._continue_from_live("a fresh workdir starts from what users are served")
        self.engine.load_policy(self.model.save_pretrained)
        return self

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
        lc = self.cfg.learner
        conversations = [p.messages for p in batch.prompts]
        t1 = time.perf_counter()
        candidates = self.engine.sample(conversations)
        t2 = time.perf_counter()
        scores = self.reward_fn(conversations, candidates)
        t3 = time.perf_counter()

        rewards = torch.tensor(
            [[float("nan") if s is None else s for s in row] for row in scores], dtype=torch.float32
        )  # [P, G]
        valid = ~rewards.isnan()
        advantages = group_advantages(
            rewards, valid, std_floor=self.cfg.learner.advantage_std_floor
        )
        examples = [
            training_inputs(self.tokenizer, conv, cand.token_ids)
            for conv, group in zip(conversations, candidates, strict=True)
            for cand in group
        ]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        batch_tensors = collate(examples, pad_id)
        batch_tensors["advantages"] = advantages.flatten()
        input_tokens = batch_tensors["attention_mask"].sum().item()
        passes = [
            {k: v.to(self.device) for k, v in mb.items()}
            for mb in micro_batches(batch_tensors, lc.micro_batch_completions)
        ]
        stats = grpo_step(self.model, self.layers, self.optimizer, passes, lc)
        del passes, batch_tensors
        return_freed_memory()  # the update's activations, until the next update
        self.engine.load_policy(self.model.save_pretrained)
        t4 = time.perf_counter()

        self.step += 1
        self.offsets.update(batch.next_offsets)
        self.deferred = batch.deferred
        lengths = [len(c.token_ids) for group in candidates for c in group]
        scored = rewards[valid]
        zero_variance = [
            row[v].unique().numel() <= 1 for row, v in zip(rewards, valid, strict=True)
        ]
        report = StepReport(
            step=self.step,
            reward_mean=scored.mean().item() if scored.numel() else float("nan"),
            reward_std=scored.std().item() if scored.numel() > 1 else 0.0,
            zero_variance_groups=sum(zero_variance) / len(zero_variance),
            unparsable=int((~valid).sum()),
            kl=float(stats.get("kl", torch.tensor(0.0))),
            loss=float(stats["loss"]),
            grad_norm=float(stats["grad_norm"]),
            completion_tokens=sum(lengths) / len(lengths),
            tokens_per_s=(input_tokens + sum(lengths)) / (t4 - t0),
            seconds={"batch": t1 - t0, "rollout": t2 - t1, "reward": t3 - t2, "update": t4 - t3},
        )
        self._export(report, scored, lengths)
        # Rewards stay [P*G] with NaN for unscored candidates so they pair with `lengths`.
        drift.MONITOR.observe_step(
            rewards.flatten().tolist(), lengths, report.zero_variance_groups, self.parent_version
        )
        _crash_point("mid-step")
        if self.step % lc.checkpoint_every_steps == 0:
            report.candidate_version = self.checkpoint(report)
        return report

    def checkpoint(self, report: StepReport) -> int:
        """Checkpoint → candidate version → commit offsets, in that order (see checkpoint.py)."""
        state = CheckpointState(
            step=self.step,
            next_offsets=dict(self.offsets),
            trained_offsets=checkpoint.trained_ranges(self.checkpoint_offsets, self.offsets),
            deferred=self.deferred,
            parent_version=self.parent_version,
            metrics={"reward_mean": report.reward_mean, "kl": report.kl, "loss": report.loss},
        )
        path = checkpoint.save(self.workdir, state, self.model, self.optimizer)
        metrics.CHECKPOINTS.inc()
        version = self._publish(path, state)
        _crash_point("before-commit")
        self.source.commit(state.next_offsets)
        self.checkpoint_offsets = dict(self.offsets)
        self.parent_version = version
        _crash_point("before-verdict")
        if self._judge(version):
            self.engine.load_policy(self.model.save_pretrained)
        return version

    def _judge(self, version: int) -> bool:
        """Gate `version` if it has no verdict yet; if it is rejected, continue from live.
        True when the training weights changed."""
        if self.gate and version not in self.lifecycle.state().gate_results:
            self._gate(version)
        if self.lifecycle.registry.state_of(version) == "rejected":
            return self._continue_from_live(f"v{version}, this run's newest, was rejected")
        return False

    def _gate(self, version: int) -> None:
        """Candidate vs live, judged on the version's own files, read once: the same bytes go
        to the engine and into the training model (for the KL canary), and the verdict is
        recorded against their hash, so it belongs to the weights it judged."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load as load_safetensors

        registry = self.lifecycle.registry
        verified = verify_adapter(
            registry.path(version), self.fingerprint, self.cfg.learner.lora_rank
        )
        if verified.problems:
            self.lifecycle.reject(version, "gate", "; ".join(verified.problems))
            return
        weights = verified.files[WEIGHTS]
        set_peft_model_state_dict(self.model, load_safetensors(weights))
        judged = verified.materialize(self.workdir / "gate" / f"v{version}")
        live = self.lifecycle.state().live
        candidate_lora = self.engine.lora_request(judged, "candidate")
        live_lora = self.engine.lora_request(registry.path(live), "live") if live else None
        try:
            result = self.gate.evaluate(candidate_lora, live_lora)
        finally:
            self.engine.drop(candidate_lora)
            self.engine.drop(live_lora)
            shutil.rmtree(judged, ignore_errors=True)
        drift.record_gate_result(
            version,
            score_diff=result.score_diff,
            probe_kl=result.kl,
            win_rate=result.win_rate,
            ifeval_accuracy=result.ifeval_candidate,
        )
        metrics.GATE_OUTCOMES.labels(result.outcome).inc()
        _, action = self.lifecycle.record_verdict(
            version,
            result.model_dump(),
            hashlib.sha256(weights).hexdigest(),
            self.cfg.gate.auto_promote,
            self.cfg.gate.on_inconclusive,
            canary=self.cfg.gate.canary_rule() if self.cfg.gate.canary_share else None,
        )
        log.info(
            "gate v%d: %s, %s (score %+.3f vs live, 95%% CI %+.3f..%+.3f)%s",
            version,
            result.outcome,
            action,
            result.score_diff,
            *result.score_diff_ci,
            "".join(f"; {r}" for r in result.reasons),
        )

    def _continue_from_live(self, why: str) -> bool:
        """Training weights := the live version (a fresh adapter while the base model is live),
        with a fresh optimiser. True (the weights changed)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        live = self.lifecycle.state().live
        if live is None:
            for layer in self.layers:
                layer.reset_lora_parameters("default", init_lora_weights=True)
        else:
            path = self.lifecycle.registry.path(live) / WEIGHTS
            set_peft_model_state_dict(self.model, load_file(str(path)))
        self.optimizer = make_optimizer(self.model, self.cfg.learner)
        self.parent_version = live
        log.info("%s: training continues from %s", why, f"v{live}" if live else "the base model")
        return True

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

    def _publish(self, path: Path, state: CheckpointState) -> int:
        """The checkpoint's candidate version (published now unless a crash came after it was)."""
        manifest = self.lifecycle.publish(
            path / "adapter",
            lineage=f"{self.run_id}/{state.name}",
            parent_version=state.parent_version,
            base_model=self.cfg.model.path or Path(self.model_path).name,
            base_fingerprint=self.fingerprint,
            trained_offsets=state.trained_offsets,
            steps=state.step,
            metrics=state.metrics,
        )
        metrics.LAST_CANDIDATE_VERSION.set(manifest.version)
        return manifest.version

    def _export(self, report: StepReport, scored: torch.Tensor, lengths: list[int]) -> None:
        metrics.STEPS.inc()
        for value in scored.tolist():
            metrics.REWARD.observe(value)
        for n in lengths:
            metrics.COMPLETION_TOKENS.observe(n)
        metrics.SCORED.inc(scored.numel() + report.unparsable)
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
