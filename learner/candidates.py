"""From training weights to a judged candidate version, in the one order that survives a crash:

    checkpoint   adapter + optimiser + offsets on disk (learner/checkpoint.py)
    publish      the checkpoint's candidate version in the registry, once per lineage
    commit       the Kafka offsets it was trained on
    judge        the gate's verdict, recorded against the hash of the weights it judged
    continue     from `live` when the version is rejected (by the gate or an operator)

A crash between any two is repaired by `resume()` from the newest checkpoint: the version is
published if missing, the offsets committed again, the verdict taken if none is recorded; so no
candidate is built twice from the same records and none is skipped.

The lineage rules:
  - versions are published under "<run id>/step-N"; the run id is made once per workdir, so a
    fresh workdir never mistakes an old run's version for its own checkpoint;
  - a fresh workdir starts from `live` (what users are served);
  - when the version a checkpoint became is rejected, training continues from `live`, now and
    after any restart: the registry's verdict is the durable record of it, read at every setup.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import uuid
from pathlib import Path

from learner import checkpoint, drift, metrics
from learner.checkpoint import CheckpointState
from learner.consumer import PromptSource, TrainingPrompt
from learner.gate import Gate
from learner.rollout import Engine
from learner.trainer import Trainer
from shared.config import DynalignConfig
from shared.files import atomic_write
from shared.lifecycle import Lifecycle
from shared.registry import WEIGHTS, base_fingerprint, verify_adapter

log = logging.getLogger(__name__)

# Test hook: SIGKILL ourselves at a named point, to prove crash safety where it is hardest.
CRASH_POINT_ENV = "DYNALIGN_LEARNER_CRASH_AT"


def crash_point(name: str) -> None:
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


class CandidatePipeline:
    def __init__(
        self,
        cfg: DynalignConfig,
        workdir: Path,
        model_path: str,
        trainer: Trainer,
        engine: Engine,
        lifecycle: Lifecycle,
        gate: Gate | None,
    ) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.model_path = model_path
        self.trainer = trainer
        self.engine = engine
        self.lifecycle = lifecycle
        self.gate = gate
        self.run_id = run_id(workdir)
        self.fingerprint = base_fingerprint(model_path)
        self.parent_version: int | None = None  # the version the training weights came from
        self.covered: dict[str, int] = {}  # next offsets of the newest checkpoint
        self.source: PromptSource | None = None  # set by resume(): where offsets are committed

    def resume(
        self, found: tuple[Path, CheckpointState] | None, source: PromptSource, offsets: dict
    ) -> None:
        """After setup restored `found` (the newest checkpoint) or found none; ends with the
        training weights loaded as the engine's policy."""
        self.source = source
        self.covered = dict(offsets)
        if found is None:
            self._continue_from_live("a fresh workdir starts from what users are served")
        else:
            # A crash may have come between checkpoint and publish, publish and commit, or
            # commit and the gate's verdict: redo whatever is missing.
            path, state = found
            self.parent_version = self._publish(path, state)
            source.commit(state.next_offsets)
            self._judge(self.parent_version)
        self.engine.load_policy(self.trainer.save_adapter)

    def checkpoint(
        self,
        step: int,
        offsets: dict[str, int],
        deferred: list[TrainingPrompt],
        step_metrics: dict[str, float],
    ) -> int:
        """Checkpoint → candidate version → commit offsets → verdict. The candidate version."""
        state = CheckpointState(
            step=step,
            next_offsets=dict(offsets),
            trained_offsets=checkpoint.trained_ranges(self.covered, offsets),
            deferred=deferred,
            parent_version=self.parent_version,
            metrics=step_metrics,
        )
        path = checkpoint.save(self.workdir, state, self.trainer.model, self.trainer.optimizer)
        metrics.CHECKPOINTS.inc()
        version = self._publish(path, state)
        crash_point("before-commit")
        self.source.commit(state.next_offsets)
        self.covered = dict(offsets)
        self.parent_version = version
        crash_point("before-verdict")
        if self._judge(version):
            self.engine.load_policy(self.trainer.save_adapter)
        return version

    def _judge(self, version: int) -> bool:
        """Gate `version` if it has no verdict yet; if it is rejected, continue from live.
        True when the training weights changed."""
        if self.gate and version not in self.lifecycle.state().gate_results:
            self._gate(version)
        if self.lifecycle.registry.state_of(version) == "rejected":
            self._continue_from_live(f"v{version}, this run's newest, was rejected")
            return True
        return False

    def _gate(self, version: int) -> None:
        """Candidate vs live, judged on the version's own files, read once: the same bytes go
        to the engine and into the training model (for the KL canary), and the verdict is
        recorded against their hash, so it belongs to the weights it judged."""
        from safetensors.torch import load as load_safetensors

        registry = self.lifecycle.registry
        verified = verify_adapter(
            registry.path(version), self.fingerprint, self.cfg.learner.lora_rank
        )
        if verified.problems:
            self.lifecycle.reject(version, "gate", "; ".join(verified.problems))
            return
        weights = verified.files[WEIGHTS]
        self.trainer.set_adapter_weights(load_safetensors(weights))
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
            result,
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

    def _continue_from_live(self, why: str) -> None:
        """Training weights := the live version (a fresh adapter while the base model is live)."""
        from safetensors.torch import load_file

        live = self.lifecycle.state().live
        self.trainer.start_from(
            None if live is None else load_file(str(self.lifecycle.registry.path(live) / WEIGHTS))
        )
        self.parent_version = live
        log.info("%s: training continues from %s", why, f"v{live}" if live else "the base model")

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
