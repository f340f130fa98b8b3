"""The gate's KL canary runs the training model in the update's micro-batches: the whole probe
set in one forward held [probes, tokens, vocab] float32 logits twice, and the learner kept that
memory after the gate (bench/results/up.json: +0.24 GiB for the rest of the run)."""

from __future__ import annotations

import pytest
import torch

from learner.gate import Gate
from learner.grpo import collate, kl_k3, training_inputs
from learner.policy import adapters_disabled, sequence_logprobs
from learner.rollout import Completion
from learner.trainer import Trainer
from shared.config import GateConfig, LearnerConfig

PROBES = 6


@pytest.fixture(scope="module")
def trainer(tiny_model) -> Trainer:
    trainer = Trainer.load(str(tiny_model), LearnerConfig())
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that moved: B=0 at init would make every KL 0
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return trainer


def answers(trainer: Trainer, probes) -> list[Completion]:
    """Answers of different lengths, so that micro-batches pad differently."""
    ids = trainer.tokenizer("one two three four five six seven eight")["input_ids"]
    return [Completion(ids[: 2 + i], "", "length") for i in range(len(probes))]


def whole_batch_kl(trainer: Trainer, gate: Gate, completions) -> float:
    """The definition, unbatched: every answer's tokens scored alone."""
    pad = trainer.tokenizer.eos_token_id
    total, tokens = 0.0, 0
    for probe, completion in zip(gate.probes, completions, strict=True):
        batch = collate([training_inputs(trainer.tokenizer, probe, completion.token_ids)], pad)
        args = [batch[k] for k in ("input_ids", "attention_mask", "completion_mask")]
        with torch.no_grad():
            logp = sequence_logprobs(trainer.model, *args)
            with adapters_disabled(trainer.layers):
                ref = sequence_logprobs(trainer.model, *args)
        total += float(kl_k3(logp, ref)[args[2].bool()].sum())
        tokens += int(args[2].sum())
    return total / tokens


def test_kl_canary_runs_in_micro_batches_and_equals_the_per_answer_definition(trainer):
    cfg = GateConfig(probe_limit=PROBES, ifeval_prompts=0)
    gate = Gate(cfg, None, trainer.model, trainer.layers, trainer.tokenizer, micro_batch=2)
    completions = answers(trainer, gate.probes)
    rows_seen: list[int] = []
    hook = trainer.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows_seen.append(kwargs["input_ids"].size(0)), with_kwargs=True
    )
    try:
        kl = gate._kl_to_base(completions)
    finally:
        hook.remove()
    assert rows_seen == [2] * PROBES  # 3 micro-batches, with and without the adapter
    assert kl > 0
    # fp32, left-padded in a batch against each answer alone: 1.6e-3 apart under one of
    # pytest-randomly's seeds (a KL of 0.34 from sums over tokens), so 5e-3
    assert kl == pytest.approx(whole_batch_kl(trainer, gate, completions), rel=5e-3)
