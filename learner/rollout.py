"""Rollouts and self-scoring: what the learner asks of an inference engine, and the learner's own
in-process engine.

`Engine` holds the recipe (G candidates per prompt under the CA system prompt, the policy's
0-5 self-scores, the frozen base's scores for the gate) on four primitives an engine provides:
generate, token_distribution, lora_request, drop. Two engines provide them:
  - `ServedEngine` (learner/served.py): a `dynalign serve` engine, the one users are served by
    (`learner.rollout_endpoints`; what `dynalign up` uses): the learner holds only the trainer;
  - `InProcessEngine` (here): a vLLM engine of the learner's own, for offline tools and tests
    that need no server (TRL's "colocate" mode, beside its "server" mode).

The policy is base + the learner's latest adapter. After every optimiser step the adapter is
saved and loaded under a new engine name: vLLM keys its prefix cache by adapter name, so changed
weights must never reuse an old name.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.consumer import Unusable
from learner.grpo import prompt_ids, rollout_messages
from shared.chat import content_text
from shared.config import LearnerConfig, ModelConfig
from shared.reward import expected_score, parse_score, reward_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class Sampling:
    """What both engines sample with: n candidates, nucleus sampling (temperature 0: greedy)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 16


# Tokens the judge generates after its prompt, by reward_mode: one digit's distribution, or a
# short reply to parse.
JUDGE_TOKENS = {"expected": 1, "greedy": 8}


def judge_request(messages: list[dict[str, Any]], response: str) -> list[dict[str, str]]:
    """The paper's reward prompt as one user turn. The request is the last user message; earlier
    turns, if any, come first as a transcript so the judge sees what the answer responds to."""
    *history, last = messages
    request = content_text(last.get("content"))
    if history:
        transcript = "\n".join(
            f"{m.get('role')}: {content_text(m.get('content'))}" for m in history
        )
        request = f"{transcript}\nuser: {request}"
    return [{"role": "user", "content": reward_prompt(request, response)}]


def check_fits(
    tokenizer: Any, messages: list[dict[str, Any]], cfg: LearnerConfig, max_model_len: int
) -> None:
    """Raise Unusable unless `messages` render in the three ways the learner uses them and fit:
    as trained on (at most max_prompt_tokens), and in the engine (max_model_len) both when rolled
    out under the CA system prompt and when judged around an answer of max_new_tokens."""
    try:
        trained = len(prompt_ids(tokenizer, messages))
        rollout = len(prompt_ids(tokenizer, rollout_messages(messages)))
        judged = len(prompt_ids(tokenizer, judge_request(messages, "")))
    except Exception as exc:  # a chat template can raise anything (jinja2 errors, TypeError)
        raise Unusable("unrenderable") from exc
    if trained > cfg.max_prompt_tokens:
        raise Unusable("too_long")
    if max(rollout, judged + JUDGE_TOKENS[cfg.reward_mode]) + cfg.max_new_tokens > max_model_len:
        raise Unusable("too_long_for_model")


def judgeable(
    tokenizer: Any, requests: Sequence[list[dict[str, str]]], reward_mode: str, max_model_len: int
) -> list[int]:
    """Indices of the judge requests the engine can take. check_fits budgets max_new_tokens for
    the answer, but the answer's text re-tokenised inside the judge prompt can come out longer
    (a character cut at the token limit decodes to U+FFFD, ...); vLLM refuses a prompt that
    leaves no room, failing the whole batch, so such a candidate stays unscored instead."""
    return [
        i
        for i, request in enumerate(requests)
        if len(prompt_ids(tokenizer, request)) + JUDGE_TOKENS[reward_mode] <= max_model_len
    ]


def _digit_expectation(dist: Sequence[float]) -> float | None:
    """Probabilities of "0".."5" (renormalised over them) -> the expected score."""
    return expected_score({str(d): math.log(p) for d, p in enumerate(dist) if p > 0})


class Engine:
    """The recipe on an engine's primitives (see the module's docstring). `lora` handles come
    from lora_request; None is the base model."""

    def __init__(self, learner_cfg: LearnerConfig, workdir: Path, tokenizer, max_model_len: int):
        self.cfg = learner_cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.digit_ids = [self.single_token_id(d) for d in "012345"]
        self.workdir = Path(workdir)
        self.lora = None  # the current policy's adapter; None = base
        self._ids = itertools.count(1)

    # -- what an engine provides
    def lora_request(self, path: Path, prefix: str = "adapter"):
        """Load an adapter directory under a fresh engine name."""
        raise NotImplementedError

    def drop(self, lora) -> None:
        raise NotImplementedError

    def generate(
        self, conversations: Sequence[list[dict[str, Any]]], sampling: Sampling, lora
    ) -> list[list[Completion]]:
        """`sampling.n` completions per chat."""
        raise NotImplementedError

    def token_distribution(
        self, requests: Sequence[list[dict[str, str]]], token_ids: list[int], lora
    ) -> list[tuple[float, ...]]:
        """For each chat, the next-token probabilities of `token_ids`, renormalised over them."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    # -- the recipe
    def single_token_id(self, text: str) -> int:
        """The one token that spells `text` alone ("0".."5" are ids 32-37 in SmolLM2)."""
        encoded = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"{text!r} is not one token in this tokenizer ({encoded}); use reward_mode='greedy'"
            )
        return encoded[0]

    def load_policy(self, save: Callable[[Path], None]) -> None:
        """`save(dir)` writes the current PEFT adapter; it becomes the rollout policy."""
        path = self.workdir / f"policy-{next(self._ids)}"
        save(path)
        previous, self.lora = self.lora, self.lora_request(path, prefix="policy")
        if previous is not None:
            self.drop(previous)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def sample(self, conversations: Sequence[list[dict[str, Any]]]) -> list[list[Completion]]:
        """G candidates per conversation, with the CA system prompt in front (paper Table 5)."""
        sampling = Sampling(
            n=self.cfg.group_size,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_new_tokens,
        )
        return self.generate([rollout_messages(c) for c in conversations], sampling, self.lora)

    def greedy(
        self, conversations: Sequence[list[dict[str, Any]]], lora, max_tokens: int
    ) -> list[Completion]:
        """How a version answers users: greedy, no CA system prompt."""
        sampling = Sampling(max_tokens=max_tokens)
        return [group[0] for group in self.generate(list(conversations), sampling, lora)]

    def self_scores(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        candidates: Sequence[Sequence[Completion]],
        lora=None,
    ) -> list[list[float | None]]:
        """The policy judges each candidate 0-5 with the paper's reward prompt, greedily.
        `greedy` parses the text; `expected` is the probability-weighted mean digit at the
        first answer position. None = unparsable, or too long to judge (see judgeable)."""
        requests = [
            judge_request(conv, cand.text)
            for conv, group in zip(conversations, candidates, strict=True)
            for cand in group
        ]
        scorable = judgeable(self.tokenizer, requests, self.cfg.reward_mode, self.max_model_len)
        flat: list[float | None] = [None] * len(requests)
        if scorable:
            scores = self._judge([requests[i] for i in scorable], lora or self.lora)
            for i, score in zip(scorable, scores, strict=True):
                flat[i] = score
        bounds = list(itertools.accumulate([0] + [len(group) for group in candidates]))
        return [flat[a:b] for a, b in itertools.pairwise(bounds)]

    def frozen_scores(
        self, conversations: Sequence[list[dict[str, Any]]], answers: Sequence[Completion]
    ) -> list[float | None]:
        """The frozen base model's CA score of one answer per conversation: the paper's reward
        prompt, the probability-weighted mean over "0".."5" (whatever reward_mode trains with).
        The same judge for every version, never a candidate judging itself. None = too long."""
        requests = [judge_request(c, a.text) for c, a in zip(conversations, answers, strict=True)]
        scorable = judgeable(self.tokenizer, requests, "expected", self.max_model_len)
        dists = self.token_distribution([requests[i] for i in scorable], self.digit_ids, None)
        scores: list[float | None] = [None] * len(requests)
        for i, dist in zip(scorable, dists, strict=True):
            scores[i] = _digit_expectation(dist)
        return scores

    def _judge(self, requests: list[list[dict[str, str]]], lora) -> list[float | None]:
        if self.cfg.reward_mode == "expected":
            return [
                _digit_expectation(dist)
                for dist in self.token_distribution(requests, self.digit_ids, lora)
            ]
        sampling = Sampling(max_tokens=JUDGE_TOKENS["greedy"])
        return [parse_score(group[0].text) for group in self.generate(requests, sampling, lora)]


class InProcessEngine(Engine):
    """A vLLM engine in the learner's own process."""

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, workdir: Path) -> None:
        from vllm import LLM

        from shared.engine import learner_engine_kwargs

        log.info("rollout engine starting on %s", model_cfg.path or "the default model")
        # Slots for the policy, the version being swapped in, and the gate's live version.
        # Processed log-probs are taken after `allowed_token_ids` masks the vocabulary: over a
        # few allowed tokens they are exactly the model's distribution renormalised over them.
        self.llm = LLM(
            **learner_engine_kwargs(model_cfg, max_loras=3), logprobs_mode="processed_logprobs"
        )
        super().__init__(
            learner_cfg,
            workdir,
            self.llm.get_tokenizer(),
            self.llm.llm_engine.model_config.max_model_len,
        )

    def shutdown(self) -> None:
        """End the engine-core process now. vLLM 0.32's LLM has no shutdown of its own; its engine
        client's terminates the process, then kills it after a grace period."""
        self.llm.llm_engine.engine_core.shutdown()

    def lora_request(self, path: Path, prefix: str = "adapter"):
        from vllm.lora.request import LoRARequest

        lora_id = next(self._ids)
        request = LoRARequest(f"{prefix}-{lora_id}", lora_id, str(path))
        self.llm.llm_engine.add_lora(request)
        return request

    def drop(self, lora) -> None:
        if lora is not None:
            self.llm.llm_engine.remove_lora(lora.lora_int_id)

    def generate(self, conversations, sampling: Sampling, lora) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
        )
        outputs = self.llm.chat(list(conversations), params, lora_request=lora, use_tqdm=False)
        return [
            [Completion(list(o.token_ids), o.text, o.finish_reason) for o in out.outputs]
            for out in outputs
        ]

    def token_distribution(self, requests, token_ids: list[int], lora) -> list[tuple[float, ...]]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=1, logprobs=len(token_ids), allowed_token_ids=token_ids
        )
        outputs = self.llm.chat(list(requests), params, lora_request=lora, use_tqdm=False)
        dists = []
        for out in outputs:
            logprobs = out.outputs[0].logprobs[0]
            dists.append(
                tuple(math.exp(logprobs[t].logprob) if t in logprobs else 0.0 for t in token_ids)
            )
        return dists
