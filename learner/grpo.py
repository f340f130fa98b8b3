"""GRPO for one batch of replayed prompts: group advantages, per-token log-probs, the clipped loss,
and the two renderings of a prompt (rollout WITH the Collective-Agency system prompt, training
WITHOUT it, as the paper removes it from the sequence the loss sees).

Batch layout is TRL's: prompts left-padded, completions right-padded, so every completion starts
at the same column and the loss only sees the completion block [B, C].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shared.chat import text_messages
from shared.prompts import OUTPUT_SYSTEM_PROMPT

# -----------------------------------------------------------------------------
# advantages


def group_advantages(
    rewards: Tensor, valid: Tensor, eps: float = 1e-4, std_floor: float = 0.0
) -> Tensor:
    """(reward - group mean) / (max(group std, std_floor) + eps), over each group's valid members.

    rewards [P, G] (anything where ~valid, NaN included), valid [P, G] bool -> [P, G].
    As TRL 1.16 (scale_rewards="group", trl.trainer.utils.nanstd): the *sample* std (Bessel, n-1)
    and eps=1e-4; an unparsable candidate is left out of its group's statistics and gets 0.
    A group with < 2 valid members or one distinct reward has no signal: all zeros (tested
    exactly via max == min, so float rounding in the mean cannot leak a tiny advantage).
    std_floor (not in TRL): expected self-scores of near-equal answers differ by numeric jitter
    (4.300 +- 0.002); dividing by that std would turn the jitter into full-size advantages.
    """
    valid = valid.bool()
    r = torch.where(valid, rewards, 0.0)  # NaN-free: NaN * 0 would poison the sums
    w = valid.to(r.dtype)
    n = w.sum(-1, keepdim=True)  # [P, 1]
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * w) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    adv = (r - mean) / (var.sqrt().clamp(min=std_floor) + eps)
    hi = torch.where(valid, r, -torch.inf).amax(-1, keepdim=True)
    lo = torch.where(valid, r, torch.inf).amin(-1, keepdim=True)
    return torch.where(valid & (n >= 2) & (hi > lo), adv, 0.0)


# -----------------------------------------------------------------------------
# log-probs

# Rows per chunk so one fp32 chunk of logits stays at 2**26 elements (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits)[ids] in fp32 chunks of rows, keeping only the logsumexp for backward.

    Autograd through `logits.float().log_softmax(-1)` would hold an fp32 [N, V] copy until
    backward; here the extra memory is one chunk, and backward recomputes softmax per chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor) -> Tensor:  # logits [N, V], ids [N] -> [N] fp32
        rows = max(1, _CHUNK_ELEMENTS // logits.size(1))
        lse = torch.cat([torch.logsumexp(x.float(), -1) for x in logits.split(rows)])  # [N]
        ctx.save_for_backward(logits, ids, lse)
        ctx.rows = rows
        return logits.gather(1, ids[:, None]).squeeze(1).float() - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # grad [N]
        logits, ids, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.size(0), ctx.rows):
            e = s + ctx.rows
            g = grad[s:e, None]
            # d logp[id] / d logits = onehot(id) - softmax(logits)
            d = (logits[s:e].float() - lse[s:e, None]).exp_().mul_(-g)
            out[s:e] = d.scatter_add_(1, ids[s:e, None], g)
        return out, None


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """logits [B, T, V], ids [B, T] -> [B, T] fp32 log p(ids).

    Not trl.trainer.utils.selective_log_softmax: off-GPU it runs log_softmax in the logits' dtype
    for bf16 (bf16-precision log-probs, and autograd keeps a full [T, V] log_softmax per row),
    while ratios and the k3 KL need fp32 log-probs at bf16-logit memory cost."""
    B, T, V = logits.shape
    return _TokenLogprobs.apply(logits.reshape(B * T, V), ids.reshape(B * T)).view(B, T)


# -----------------------------------------------------------------------------
# loss


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref) from samples of pi, as TRL uses it:
    e^d - d - 1 with d = ref - logp. [B, T] -> [B, T], >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate + beta * k3 KL, averaged over every completion token of the batch.

    logp, old_logp, ref_logp [B, T]; advantages [B]; mask [B, T] -> (scalar loss, stats).
    n_tokens: the completion tokens of the whole optimiser step when this is one micro-batch of
    it (default: mask's); dividing each micro-batch by the total makes the accumulated gradients
    and summed stats those of the whole batch, as TRL's num_items_in_batch does.
    Aggregation is TRL 1.16's default loss_type="dapo": sum over all unmasked tokens / their count
    (no per-sequence mean, so long answers are not down-weighted). The KL term is plain k3, i.e.
    TRL with use_bias_correction_kl=False (its default True multiplies the KL by the ratio).
    ref_logp may be None when beta == 0. Stats are detached 0-dim tensors (no host sync).
    """
    m = mask.bool()
    n = (m.sum() if n_tokens is None else n_tokens).clamp(min=1)
    a = advantages[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    stats = {}
    if beta != 0.0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = (torch.where(m, kl, 0.0).sum() / n).detach()
    loss = torch.where(m, per_token, 0.0).sum() / n
    # TRL's clip_ratio/region_mean: tokens where clipping zeroes the gradient
    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
    stats["clip_frac"] = ((clipped & m).sum() / n).detach()
    return loss, stats


# -----------------------------------------------------------------------------
# sequences


def rollout_messages(
    messages: list[dict[str, Any]], system_prompt: str = OUTPUT_SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """The user's conversation (as text) with the CA system prompt in front, for sampling the G
    answers.

    A user system message is merged into one (CA prompt + "\\n\\n" + user's system text), not
    kept as a second system message: many chat templates accept a system message only first."""
    messages = text_messages(messages)
    if messages and messages[0].get("role") == "system":
        merged = f"{system_prompt}\n\n{messages[0]['content']}"
        return [{"role": "system", "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Chat-template token ids of `messages` (as text) followed by the assistant turn's header."""
    return tokenizer.apply_chat_template(
        text_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=False
    )


def training_inputs(
    tokenizer: Any, messages: list[dict[str, Any]], completion_ids: list[int]
) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) of the sequence the loss sees: the user's conversation
    rendered WITHOUT the CA system prompt, then the completion sampled under it. [T], [T]."""
    prompt = prompt_ids(tokenizer, messages)
    return prompt + list(completion_ids), [0] * len(prompt) + [1] * len(completion_ids)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """training_inputs() outputs -> input_ids [B, P+C], attention_mask [B, P+C], completion_mask
    [B, C]: prompts left-padded and completions right-padded so the completions share columns."""
    split = [(ids[: len(ids) - sum(cm)], ids[len(ids) - sum(cm) :]) for ids, cm in examples]
    P = max(len(p) for p, _ in split)
    C = max(len(c) for _, c in split)
    B = len(split)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(split):
        input_ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attention_mask[i, P - len(p) : P + len(c)] = 1
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=attention_mask[:, P:]
    )


def micro_batches(batch: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """collate()'s batch (plus per-row tensors such as "advantages") -> row slices of at most
    `size` completions for gradient accumulation, each without the columns that are padding in
    all of its rows: the G completions of a prompt share its length, so a group-sized slice
    carries no prompt padding. Same layout as collate()'s; CPU tensors (no device sync)."""
    C = batch["completion_mask"].size(1)
    slices = []
    for start in range(0, batch["input_ids"].size(0), size):
        rows = {k: v[start : start + size] for k, v in batch.items()}
        P = rows["input_ids"].size(1) - C
        first = int(rows["attention_mask"][:, :P].any(0).int().argmax())  # left padding ends
        width = max(1, int(rows["completion_mask"].any(0).sum()))  # right padding starts
        for key in ("input_ids", "attention_mask"):
            rows[key] = rows[key][:, first : P + width]
        rows["completion_mask"] = rows["completion_mask"][:, :width]
        slices.append(rows)
    return slices
