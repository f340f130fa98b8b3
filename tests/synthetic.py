"""Synthetic adapter versions for tests and benchmarks: real PEFT LoRA files with chosen weights,
published like the learner publishes, so serving and the gate see nothing special about them."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import torch

from shared.lifecycle import Lifecycle
from shared.registry import Manifest, Registry, base_fingerprint


def random_lora(
    model_dir: Path, out: Path, rank: int = 8, scale: float = 0.05, seed: int = 0
) -> Path:
    """A LoRA on every linear layer with random A and B (B at `scale`), saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    peft_model.save_pretrained(out)
    return out


def publish_random(
    registry: Registry,
    model_dir: Path,
    *,
    rank: int = 8,
    scale: float = 0.05,
    seed: int = 0,
    fingerprint: str | None = None,
) -> Manifest:
    with tempfile.TemporaryDirectory() as tmp:
        random_lora(model_dir, Path(tmp) / "adapter", rank=rank, scale=scale, seed=seed)
        return Lifecycle(registry).publish(
            Path(tmp) / "adapter",
            lineage=f"synthetic/{uuid.uuid4().hex}",
            actor="synthetic",
            parent_version=None,
            base_model=Path(model_dir).name,
            base_fingerprint=fingerprint or base_fingerprint(model_dir),
            steps=0,
        )
