"""The gate between a candidate adapter and `live`: nothing goes live ungated.

On a held-out probe set (shipped CA task prompts in the paper's style, or datagen output):
  pairwise   candidate vs live, judged in both orders, a win only when consistent (paper 3.1);
             the judge is the policy itself (verdict read from the probabilities of "A" and
             "B", as the learner's `expected` reward does) or any OpenAI-compatible endpoint;
  canaries   KL to the base model on the candidate's answers, answer-length growth vs live,
             the self-score unparsable rate of the candidate's answers.
Pass → promote (unless pinned or `auto_promote` is off); fail → rejected, with reasons.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel

from learner.grpo import collate, training_inputs
from learner.policy import adapters_disabled, sequence_logprobs
from learner.rollout import RolloutEngine
from shared.config import GateConfig
from shared.files import read_jsonl
from shared.judge import (
    JUDGE_PROMPT,
    JudgeSettings,
    Verdict,
    judge_items,
    parse_target,
    summarize_pairwise,
    verdict_from_probs,
)


class GateResult(BaseModel):
    passed: bool
    reasons: list[str]
    win_rate: float | None
    wins: int
    losses: int
    inconsistent: int
    kl: float
    length_ratio: float
    unparsable_rate: float
    ifeval_candidate: float | None = None
    ifeval_live: float | None = None


def probe_prompts(cfg: GateConfig) -> list[list[dict[str, str]]]:
    path = cfg.probe_prompts or resources.files("shared") / "data" / "probe_prompts.jsonl"
    rows = [row for _, row in read_jsonl(Path(str(path)))]
    return [
        row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        for row in rows[: cfg.probe_limit]
    ]


class Gate:
    def __init__(self, cfg: GateConfig, engine: RolloutEngine, model, layers, tokenizer) -> None:
        self.cfg = cfg
        self.engine = engine
        self.model, self.layers, self.tokenizer = model, layers, tokenizer
        self.probes = probe_prompts(cfg)
        self.letter_ids = [engine.single_token_id(letter) for letter in "AB"]
        if cfg.ifeval_prompts:
            from shared.ifeval import load_examples, prepare_offline_nltk

            prepare_offline_nltk()
            self.ifeval_examples = load_examples(limit=cfg.ifeval_prompts)
            self.ifeval_chats = [
                [{"role": "user", "content": e.prompt}] for e in self.ifeval_examples
            ]

    def evaluate(self, candidate_lora, live_lora) -> GateResult:
        """candidate_lora / live_lora: vLLM LoRARequests (None = the base model)."""
        mine = self.engine.greedy(self.probes, candidate_lora, self.cfg.max_new_tokens)
        theirs = self.engine.greedy(self.probes, live_lora, self.cfg.max_new_tokens)
        verdicts = self._judge(
            [m[-1]["content"] for m in self.probes],
            [c.text for c in mine],
            [c.text for c in theirs],
            candidate_lora,
        )
        summary = summarize_pairwise(verdicts, n_resamples=200)
        kl = self._kl_to_base(mine)
        length_ratio = sum(len(c.token_ids) for c in mine) / max(
            1, sum(len(c.token_ids) for c in theirs)
        )
        scores = self.engine.self_scores(self.probes, [[c] for c in mine], lora=candidate_lora)
        unparsable = sum(s[0] is None for s in scores) / len(scores)

        ifeval = self._ifeval(candidate_lora, live_lora) if self.cfg.ifeval_prompts else None

        reasons = []
        if summary.win_rate is not None and summary.win_rate < self.cfg.min_win_rate:
            reasons.append(
                f"pairwise win rate {summary.win_rate:.2f} < {self.cfg.min_win_rate} "
                f"({summary.wins} wins, {summary.losses} losses vs live)"
            )
        if kl > self.cfg.max_kl:
            reasons.append(f"KL to base {kl:.3f} > {self.cfg.max_kl} nats/token")
        if length_ratio > self.cfg.max_length_ratio:
            reasons.append(f"answer length grew {length_ratio:.2f}x > {self.cfg.max_length_ratio}x")
        if unparsable > self.cfg.max_unparsable_rate:
            reasons.append(
                f"unparsable self-scores {unparsable:.0%} > {self.cfg.max_unparsable_rate:.0%}"
            )
        if ifeval and ifeval[1] - ifeval[0] > self.cfg.max_ifeval_drop:
            reasons.append(
                f"IFEval canary fell from {ifeval[1]:.2f} to {ifeval[0]:.2f} "
                f"(> {self.cfg.max_ifeval_drop} drop)"
            )
        return GateResult(
            passed=not reasons,
            reasons=reasons,
            win_rate=summary.win_rate,
            wins=summary.wins,
            losses=summary.losses,
            inconsistent=summary.inconsistent,
            kl=kl,
            length_ratio=length_ratio,
            unparsable_rate=unparsable,
            ifeval_candidate=ifeval[0] if ifeval else None,
            ifeval_live=ifeval[1] if ifeval else None,
        )

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

    def _judge(
        self, prompts: list[str], mine: list[str], theirs: list[str], policy_lora
    ) -> list[tuple[Verdict, Verdict]]:
        """(verdict with the candidate shown as A, verdict with it shown as B) per probe."""
        if self.cfg.judge_endpoint:
            settings = JudgeSettings(endpoint=parse_target(self.cfg.judge_endpoint))
            judged = asyncio.run(
                judge_items(settings, list(zip(prompts, mine, theirs, strict=True)))
            )
            return [(j.first.verdict, j.second.verdict) for j in judged]
        requests = [
            [{"role": "user", "content": JUDGE_PROMPT.format(prompt=p, response_a=a, response_b=b)}]
            for p, x, y in zip(prompts, mine, theirs, strict=True)
            for a, b in ((x, y), (y, x))
        ]
        probs = self.engine.token_distribution(requests, self.letter_ids, policy_lora)
        letters = [verdict_from_probs(pa, pb) for pa, pb in probs]
        return list(zip(letters[0::2], letters[1::2], strict=True))

    @torch.no_grad()
    def _kl_to_base(self, answers) -> float:
        """Mean per-token KL(candidate || base) on the candidate's own greedy answers (k3
        estimate, as in the loss), computed by the training model with the adapter on/off."""
        from learner.grpo import kl_k3

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
        batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logp = sequence_logprobs(self.model, *args)
        with adapters_disabled(self.layers):
            ref = sequence_logprobs(self.model, *args)
        mask = batch["completion_mask"].bool()
        return float(kl_k3(logp, ref)[mask].mean())
