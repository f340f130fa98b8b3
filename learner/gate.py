"""The gate between a candidate adapter and `live`: nothing goes live ungated.

On a held-out probe set (shipped CA task prompts in the paper's style, or datagen output), both
versions answer greedily and the evidence is weighed:
  score      the frozen base model's CA score (the paper's reward prompt, expected over 0-5) of
             each probe's two answers, paired: mean difference (candidate - live) with a
             bootstrap CI. pass: not worse by more than gate.score_margin (CI low end above
             -margin); reject: worse by more (CI high end below -margin); else inconclusive;
  pairwise   only with gate.judge_endpoint: candidate vs live judged in both orders, a win only
             when consistent (paper 3.1); reject when the win rate's whole CI is below
             gate.min_win_rate;
  canaries   KL to the base model on the candidate's answers, answer-length growth vs live,
             IFEval prompt-level strict accuracy vs live: any one tripping rejects.
The verdict goes to the lifecycle, which promotes, rejects or holds (gate.on_inconclusive).
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

import torch

from learner.grpo import collate, kl_k3, micro_batches, training_inputs
from learner.policy import adapters_disabled, sequence_logprobs
from learner.rollout import Engine
from shared.config import GateConfig
from shared.files import read_jsonl
from shared.gate_result import GateOutcome, GateResult
from shared.judge import (
    JudgeSettings,
    bootstrap_mean_ci,
    judge_items,
    parse_target,
    summarize_pairwise,
)
from shared.process import return_freed_memory


def score_outcome(ci_low: float, ci_high: float, margin: float) -> GateOutcome:
    """Non-inferiority by a margin, from the CI of the mean (candidate - live) difference."""
    if ci_low > -margin:
        return "pass"
    if ci_high < -margin:
        return "reject"
    return "inconclusive"


def probe_prompts(cfg: GateConfig) -> list[list[dict[str, str]]]:
    path = cfg.probe_prompts or resources.files("shared") / "data" / "probe_prompts.jsonl"
    rows = [row for _, row in read_jsonl(Path(str(path)))]
    return [
        row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        for row in rows[: cfg.probe_limit]
    ]


class Gate:
    def __init__(
        self, cfg: GateConfig, engine: Engine, model, layers, tokenizer, micro_batch: int
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.model, self.layers, self.tokenizer = model, layers, tokenizer
        self.micro_batch = micro_batch  # answers per forward of the KL canary, as in the update
        self.probes = probe_prompts(cfg)
        if cfg.ifeval_prompts:
            from shared.ifeval import load_examples, prepare_offline_nltk

            prepare_offline_nltk()
            self.ifeval_examples = load_examples(limit=cfg.ifeval_prompts)
            self.ifeval_chats = [
                [{"role": "user", "content": e.prompt}] for e in self.ifeval_examples
            ]

    def evaluate(self, candidate_lora, live_lora) -> GateResult:
        """candidate_lora / live_lora: vLLM LoRARequests (None = the base model)."""
        cfg = self.cfg
        mine = self.engine.greedy(self.probes, candidate_lora, cfg.max_new_tokens)
        theirs = self.engine.greedy(self.probes, live_lora, cfg.max_new_tokens)
        scores = self.engine.frozen_scores(self.probes * 2, mine + theirs)
        pairs = [
            (x, y)
            for x, y in zip(scores[: len(mine)], scores[len(mine) :], strict=True)
            if x is not None and y is not None
        ]
        reasons: list[str] = []
        if pairs:
            diff, low, high = bootstrap_mean_ci([x - y for x, y in pairs], cfg.bootstrap_resamples)
            outcome = score_outcome(low, high, cfg.score_margin)
            said = (
                f"frozen-judge score {diff:+.3f} vs live (95% CI {low:+.3f}..{high:+.3f}, "
                f"margin {cfg.score_margin}, {len(pairs)} probes)"
            )
            if outcome != "pass":
                reasons.append(said)
        else:
            diff = low = high = float("nan")
            outcome = "inconclusive"
            reasons.append("no probe could be scored (too long for the engine)")
        result = GateResult(
            outcome=outcome,
            reasons=reasons,
            probes=len(pairs),
            score_candidate=sum(x for x, _ in pairs) / max(1, len(pairs)),
            score_live=sum(y for _, y in pairs) / max(1, len(pairs)),
            score_diff=diff,
            score_diff_ci=(low, high),
            score_margin=cfg.score_margin,
            kl=self._kl_to_base(mine),
            length_ratio=sum(len(c.token_ids) for c in mine)
            / max(1, sum(len(c.token_ids) for c in theirs)),
        )
        tripped = self._pairwise(result, mine, theirs) if cfg.judge_endpoint else []
        if cfg.ifeval_prompts:
            result.ifeval_candidate, result.ifeval_live = self._ifeval(candidate_lora, live_lora)
        tripped += self._canaries(result)
        if tripped:  # a lost pairwise judgement or a tripped canary rejects, whatever the score
            result.outcome = "reject"
            result.reasons += tripped
        return result

    def _canaries(self, result: GateResult) -> list[str]:
        cfg, tripped = self.cfg, []
        if result.kl > cfg.max_kl:
            tripped.append(f"KL to base {result.kl:.3f} > {cfg.max_kl} nats/token")
        if result.length_ratio > cfg.max_length_ratio:
            tripped.append(
                f"answer length grew {result.length_ratio:.2f}x > {cfg.max_length_ratio}x"
            )
        if result.ifeval_candidate is not None and result.ifeval_live is not None:
            if result.ifeval_live - result.ifeval_candidate > cfg.max_ifeval_drop:
                tripped.append(
                    f"IFEval canary fell from {result.ifeval_live:.2f} to "
                    f"{result.ifeval_candidate:.2f} (> {cfg.max_ifeval_drop} drop)"
                )
        return tripped

    def _pairwise(self, result: GateResult, mine, theirs) -> list[str]:
        """Candidate vs live by the judge endpoint, both orders per probe."""
        settings = JudgeSettings(endpoint=parse_target(self.cfg.judge_endpoint))
        items = [
            (p[-1]["content"], x.text, y.text)
            for p, x, y in zip(self.probes, mine, theirs, strict=True)
        ]
        judged = asyncio.run(judge_items(settings, items))
        summary = summarize_pairwise(
            [(j.first.verdict, j.second.verdict) for j in judged],
            n_resamples=self.cfg.bootstrap_resamples,
        )
        result.win_rate, result.win_rate_ci = summary.win_rate, (summary.ci_low, summary.ci_high)
        result.wins, result.losses = summary.wins, summary.losses
        result.inconsistent = summary.inconsistent
        if summary.ci_high is not None and summary.ci_high < self.cfg.min_win_rate:
            return [
                f"pairwise win rate {summary.win_rate:.2f} (95% CI up to {summary.ci_high:.2f}) "
                f"< {self.cfg.min_win_rate}: {summary.wins} wins, {summary.losses} losses vs live"
            ]
        return []

    def _ifeval(self, candidate_lora, live_lora) -> tuple[float, float]:
        """Prompt-level strict IFEval accuracy of (candidate, live) on the canary subset, with
        the reference checkers (offline)."""
        from shared.ifeval import evaluate_responses

        accuracies = []
        for lora in (candidate_lora, live_lora):
            answers = self.engine.greedy(self.ifeval_chats, lora, self.cfg.max_new_tokens)
            responses = {
                e.prompt: a.text for e, a in zip(self.ifeval_examples, answers, strict=True)
            }
            accuracies.append(
                evaluate_responses(self.ifeval_examples, responses)[0].prompt_level_strict
            )
        return accuracies[0], accuracies[1]

    @torch.no_grad()
    def _kl_to_base(self, answers) -> float:
        """Mean per-token KL(candidate || base) on the candidate's own greedy answers (k3
        estimate, as in the loss), computed by the training model with the adapter on/off, in
        the update's micro-batches: all 24 CPU probes at once held [24, 49, V] float32 logits
        twice, and the learner kept the 0.24 GiB afterwards (bench/results/up.json)."""
        examples = [
            training_inputs(self.tokenizer, p, c.token_ids)
            for p, c in zip(self.probes, answers, strict=True)
            if c.token_ids
        ]
        if not examples:
            return 0.0
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        device = next(self.model.parameters()).device
        total, tokens = 0.0, 0
        for rows in micro_batches(collate(examples, pad), self.micro_batch):
            args = [rows[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")]
            logp = sequence_logprobs(self.model, *args)  # [b, C]
            with adapters_disabled(self.layers):
                ref = sequence_logprobs(self.model, *args)
            mask = args[2].bool()
            total += float(kl_k3(logp, ref)[mask].sum())
            tokens += int(mask.sum())
        return_freed_memory()  # the forwards' activations, until the next gate or update
        return total / tokens
