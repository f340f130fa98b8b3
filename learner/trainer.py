"""What the learner holds (one engine serves and rolls out; the learner is a trainer, like
prime-rl's or ART's): the model with its LoRA adapter, the optimiser, and one step's batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from learner.grpo import micro_batches
from learner.policy import apply_lora, grpo_step, lora_layers, make_optimizer
from learner.trajectory import Trajectory
from shared.config import LearnerConfig
from shared.process import return_freed_memory


@dataclass
class Trainer:
    cfg: LearnerConfig
    tokenizer: Any
    model: PeftModel
    layers: list[BaseTunerLayer]
    optimizer: torch.optim.Optimizer
    device: torch.device

    @classmethod
    def load(cls, model_path: str, cfg: LearnerConfig) -> Trainer:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if cfg.train_dtype == "bfloat16" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model = apply_lora(base.to(device), cfg)
        return cls(
            cfg,
            AutoTokenizer.from_pretrained(model_path),
            model,
            lora_layers(model),
            make_optimizer(model, cfg),
            device,
        )

    def update(self, trajectory: Trajectory) -> tuple[dict[str, torch.Tensor], int]:
        """One GRPO optimiser step on the trajectory, in micro-batches of
        micro_batch_completions. Returns grpo_step's stats and the input tokens it saw."""
        batch = trajectory.training_batch(self.tokenizer)
        input_tokens = int(batch["attention_mask"].sum())
        passes = [
            {k: v.to(self.device) for k, v in mb.items()}
            for mb in micro_batches(batch, self.cfg.micro_batch_completions)
        ]
        stats = grpo_step(self.model, self.layers, self.optimizer, passes, self.cfg)
        del passes, batch
        return_freed_memory()  # the update's activations, until the next update
        return stats, input_tokens

    def start_from(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Training continues from `weights` (a version's adapter), or from a fresh adapter
        (None: the base model), with a fresh optimiser: Adam's moments belong to the path that
        was left."""
        if weights is None:
            for layer in self.layers:
                layer.reset_lora_parameters("default", init_lora_weights=True)
        else:
            self.set_adapter_weights(weights)
        self.optimizer = make_optimizer(self.model, self.cfg)

    def set_adapter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, weights)

    def save_adapter(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
