"""What one step's sampling and scoring hand to the update: a typed trajectory, as torchtune's
`GRPOTrajectory` or ART's `TrajectoryGroup` (one group of G rollouts per prompt).

    sample   prompts -> G completions each       (token ids, text, finish reason)
    score    completions -> a 0-5 score or None  (None: the judge's answer did not parse)
    here     scores -> rewards, group advantages; the batch the loss sees
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learner.grpo import collate, group_advantages, training_inputs
from learner.rollout import Completion


@dataclass(frozen=True)
class Trajectory:
    conversations: list[list[dict[str, Any]]]  # P users' conversations, without the CA prompt
    completions: list[list[Completion]]  # [P][G]
    rewards: Tensor  # [P, G] float32, NaN where unscored
    valid: Tensor  # [P, G] bool: scored
    advantages: Tensor  # [P, G]: 0 where not valid

    @classmethod
    def scored(
        cls,
        conversations: list[list[dict[str, Any]]],
        completions: list[list[Completion]],
        scores: Sequence[Sequence[float | None]],
        std_floor: float,
    ) -> Trajectory:
        rewards = torch.tensor(
            [[float("nan") if s is None else s for s in row] for row in scores], dtype=torch.float32
        )  # [P, G]
        valid = ~rewards.isnan()
        advantages = group_advantages(rewards, valid, std_floor=std_floor)  # [P, G]
        return cls(conversations, completions, rewards, valid, advantages)

    def training_batch(self, tokenizer: Any) -> dict[str, Tensor]:
        """Each completion after its user's conversation (the CA system prompt removed: the
        update learns to answer so without it), padded: input_ids, attention_mask,
        completion_mask [P*G, T], advantages [P*G]."""
        examples = [
            training_inputs(tokenizer, conversation, completion.token_ids)
            for conversation, group in zip(self.conversations, self.completions, strict=True)
            for completion in group
        ]
        pad_id = tokenizer.pad_token_id
        batch = collate(examples, tokenizer.eos_token_id if pad_id is None else pad_id)
        batch["advantages"] = self.advantages.flatten()  # [P*G]
        return batch

    @property
    def lengths(self) -> list[int]:
        """Completion tokens, [P*G] in the order of rewards.flatten()."""
        return [len(c.token_ids) for group in self.completions for c in group]

    @property
    def scores(self) -> Tensor:
        """The valid rewards, [N <= P*G]."""
        return self.rewards[self.valid]

    @property
    def unparsable(self) -> int:
        return int((~self.valid).sum())

    @property
    def zero_variance_groups(self) -> float:
        """Share of groups whose scored members all got one score: they carry no gradient."""
        flat = [
            row[v].unique().numel() <= 1 for row, v in zip(self.rewards, self.valid, strict=True)
        ]
        return sum(flat) / len(flat)
