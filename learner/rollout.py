"""Rollouts and self-scoring on vLLM, in process (the same engine the server runs).

The policy is base + the learner's latest adapter. After every optimiser step the adapter is
saved and loaded under a new engine name: vLLM keys its prefix cache by adapter name, so changed
weights must never reuse an old name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from learner.grpo import rollout_messages
from learner.reward import expected_score, parse_score, reward_prompt
from shared.config import LearnerConfig, ModelConfig


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str | None


def judge_request(messages: list[dict[str, Any]], response: str) -> list[dict[str, str]]:
    """The paper's reward prompt as one user turn. The request is the last user message; earlier
    turns, if any, come first as a transcript so the judge sees what the answer responds to."""
    *history, last = messages
    request = last["content"] if isinstance(last["content"], str) else str(last["content"])
    if history:
        transcript = "\n".join(f"{m['role']}: {m['content']}" for m in history)
        request = f"{transcript}\nuser: {request}"
    return [{"role": "user", "content": reward_prompt(request, response)}]


def _digit_token_ids(tokenizer) -> list[int]:
    """The token of each digit "0".."5" written alone (ids 32-37 in SmolLM2)."""
    ids = []
    for digit in "012345":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"digit {digit!r} is not one token ({encoded}): "
                             "use reward_mode='greedy' with this tokenizer")
        ids.append(encoded[0])
    return ids


class RolloutEngine:
    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, workdir: Path) -> None:
        from vllm import LLM

        from serving.engine import engine_kwargs

        self.cfg = learner_cfg
        # Two adapter slots: the one in use and the one being swapped in. Processed log-probs
        # are taken after `allowed_token_ids` masks the vocabulary: restricted to the six
        # digits they are exactly the judge's distribution renormalised over "0".."5".
        self.llm = LLM(**engine_kwargs(model_cfg, max_loras=2),
                       logprobs_mode="processed_logprobs")
        self.digit_ids = _digit_token_ids(self.llm.get_tokenizer())
        self.workdir = Path(workdir)
        self.lora = None
        self._loads = 0

    def load_adapter(self, save: Any) -> None:
        """`save(dir)` writes the current PEFT adapter; it becomes the rollout policy."""
        from vllm.lora.request import LoRARequest

        self._loads += 1
        path = self.workdir / f"rollout-adapter-{self._loads}"
        save(path)
        previous, self.lora = self.lora, LoRARequest(f"learner-{self._loads}", self._loads,
                                                     str(path))
        self.llm.llm_engine.add_lora(self.lora)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def sample(self, conversations: Sequence[list[dict[str, Any]]]) -> list[list[Completion]]:
        """G candidates per conversation, with the CA system prompt in front (paper Table 5)."""
        from vllm import SamplingParams

        params = SamplingParams(n=self.cfg.group_size, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens,
                                seed=None)
        outputs = self.llm.chat([rollout_messages(c) for c in conversations], params,
                                lora_request=self.lora, use_tqdm=False)
        return [[Completion(list(o.token_ids), o.text, o.finish_reason) for o in out.outputs]
                for out in outputs]

    def self_scores(self, conversations: Sequence[list[dict[str, Any]]],
                    candidates: Sequence[Sequence[Completion]]) -> list[list[float | None]]:
        """The policy judges each candidate 0-5 (greedy, as the paper). `greedy` parses the
        text; `expected` reads the probabilities of the tokens "0".."5" at the first answer
        position. None = unparsable."""
        from vllm import SamplingParams

        requests = [judge_request(conv, cand.text)
                    for conv, group in zip(conversations, candidates) for cand in group]
        expected = self.cfg.reward_mode == "expected"
        if expected:
            params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=len(self.digit_ids),
                                    allowed_token_ids=self.digit_ids)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=8)
        outputs = self.llm.chat(requests, params, lora_request=self.lora, use_tqdm=False)
        if expected:
            flat = [expected_score({lp.decoded_token: lp.logprob
                                    for lp in out.outputs[0].logprobs[0].values()})
                    if out.outputs[0].logprobs else None for out in outputs]
        else:
            flat = [parse_score(out.outputs[0].text) for out in outputs]
        sizes = [len(group) for group in candidates]
        return [flat[sum(sizes[:i]): sum(sizes[:i + 1])] for i in range(len(sizes))]
