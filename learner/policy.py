"""The trainable policy: a LoRA adapter on a frozen causal LM, scored on the completion block.

The reference model of the KL term is the same network with the adapter switched off, as TRL does
for a fresh adapter (its B matrix starts at zero, so the reference is the base model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from learner.grpo import grpo_loss, token_logprobs
from shared.config import LearnerConfig


def lora_config(cfg: LearnerConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,  # "all-linear": every Linear but the LM head
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, cfg: LearnerConfig) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter ("default"); the base weights are frozen.
    peft keeps adapter weights fp32 on a bf16 base (autocast_adapter_dtype=True), so Adam updates
    of size lr * 1 are not rounded away."""
    return get_peft_model(model, lora_config(cfg))


def lora_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(layers: list[BaseTunerLayer]) -> Iterator[None]:
    """Run the base model. Flips the flag each LoRA layer's forward reads (`disable_adapters`)
    on a list collected once: peft's `disable_adapter()` walks all modules, counts parameters
    and toggles requires_grad, ~70x slower (63 ms vs 0.9 ms per on/off pair for the
    Qwen2.5-0.5B shape on a 2-core CPU; host time the GPU waits for at the start of a step).
    tests/test_grpo_math.py checks the result equals the base model's, in case peft changes."""
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probs of the completion block (the last C columns, learner.grpo.collate's layout).

    input_ids, attention_mask [B, P+C]; completion_mask [B, C] -> [B, C] fp32, 0 on padding.
    Logits are divided by the sampling temperature, as TRL does, so they score the distribution
    the answers were drawn from."""
    C = completion_mask.size(1)
    # Positions count real tokens only, as at sampling time (vLLM never sees the left padding).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=C + 1,  # logits at column t predict token t+1: the head skips the prompt
        use_cache=False,
    )
    logits = out.logits  # [B, C+1, V]
    if temperature != 1.0:
        logits = logits / temperature
    # Score all C+1 columns against a padded target (the last one is dropped) rather than
    # slicing the logits, which would copy them to make rows contiguous.
    logp = token_logprobs(logits, F.pad(input_ids[:, -C:], (0, 1)))[:, :-1]  # [B, C]
    return logp.masked_fill(completion_mask == 0, 0.0)


def make_optimizer(model: nn.Module, cfg: LearnerConfig) -> torch.optim.Optimizer:
    """AdamW over the adapter, as TRL's Trainer builds it (adamw_torch_fused, no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)


def grpo_step(
    model: nn.Module,
    layers: list[BaseTunerLayer],
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, Tensor]],
    cfg: LearnerConfig,
) -> dict[str, Tensor]:
    """One on-policy GRPO update over the micro-batches of one optimiser step
    (learner.grpo.micro_batches, on the model's device): per micro-batch reference log-probs
    (adapter off), policy log-probs, loss, backward; then clip and Adam once. With one update per
    batch the old policy is the current one: old_logp = logp.detach() (ratio 1 in value, the
    gradient of the surrogate still flows). Returns detached 0-dim stats of the whole step;
    nothing here waits for the device."""
    amp = torch.autocast(
        batches[0]["input_ids"].device.type, torch.bfloat16, enabled=cfg.train_dtype == "bfloat16"
    )
    n_tokens = sum(b["completion_mask"].sum() for b in batches)
    totals: dict[str, Tensor] = {}
    for b in batches:
        ids, am, cm = b["input_ids"], b["attention_mask"], b["completion_mask"]
        ref = None
        if cfg.kl_beta != 0.0:
            with torch.no_grad(), amp, adapters_disabled(layers):
                ref = sequence_logprobs(model, ids, am, cm, cfg.temperature)
        with amp:
            logp = sequence_logprobs(model, ids, am, cm, cfg.temperature)
        loss, stats = grpo_loss(
            logp, logp.detach(), ref, b["advantages"], cm, cfg.clip_eps, cfg.kl_beta, n_tokens
        )
        loss.backward()
        stats["loss"] = loss.detach()
        for key, value in stats.items():  # each is already a share of the whole step's tokens
            totals[key] = totals[key] + value if key in totals else value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals["grad_norm"] = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals
