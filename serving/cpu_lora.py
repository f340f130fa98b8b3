"""vLLM plugin: LoRA on the CPU backend as one matmul per adapter in the batch, not per token.

vLLM's PyTorch-native punica ops (vllm/lora/ops/torch_ops, used by its CPU backend) gather each
token's LoRA matrices, `weights[indices]`, into a [tokens, out, in] copy per layer and
projection before an einsum. Scoring the learner's 32 judge prompts (~22k prefill tokens) with
the policy adapter took 369 s against 82 s for the bare model (SmolLM2-135M, 2 cores). Grouping
the tokens by adapter computes the same products as one GEMM per adapter present. Index -1 (a
request without adapter) adds nothing, as in vLLM's GPU kernels; the torch ops index slot -1,
the last one, which applies another request's adapter when every slot is in use.

Decoding, the ops' own overhead is the cost: a decode step calls them 420 times (30 layers x 7
projections x shrink and expand), and at ~95 us a call a user's one-token step on an adapter
took 96 ms against 52 ms on the bare model. So a step's grouping of its indices is worked out
once (`groups`, kept until vLLM's punica wrapper takes the next batch's mapping) and each op is
one in-place `addmm_` into its output: ~27-31 us a call. A user's 32-token chat on an adapter
took 2.4-2.5 s against 3.7-4.6 s with vLLM's ops (1.7-1.8 s on the bare model), and beside 8
learner sequences on another adapter 5.1-5.4 s against 6.2-7.6 (bench/results/cpu_lora_steps.json).

vLLM runs `register` in each of its processes (engine core, workers) through the
`vllm.general_plugins` entry point declared in pyproject.toml; it changes nothing off the CPU.
"""

from __future__ import annotations

import torch

# What a step works out once, since the punica wrapper last took a mapping (`new_step`): the
# per-token indices of its sequences, their grouping by adapter, each adapter's matrices as
# views. Keys hold tensor addresses; each entry holds its tensors, so their memory cannot pass
# to another tensor while the entry stands, and vLLM refills its index buffers in place only in
# `update_metadata`. (The engine's tensors are inference tensors: no version counter to key on.)
Groups = tuple[tuple[int, torch.Tensor | None], ...]
_step: dict[tuple, tuple] = {}
CACHED_PER_STEP = 2048  # a step's matrices: 30 layers x 10 weight stacks x a few adapters


def new_step() -> None:
    _step.clear()


def _remember(key: tuple, pinned: tuple, value):
    if len(_step) >= CACHED_PER_STEP:
        _step.clear()
    _step[key] = (pinned, value)
    return value


def _address(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape, t.stride())


def groups(indices: torch.Tensor) -> Groups:
    """(adapter slot, rows) for each adapter present; rows None: every row. Slot -1 (no
    adapter) is left out."""
    key = ("groups", *_address(indices))
    if key in _step:
        return _step[key][1]
    present = indices.unique().tolist()
    if len(present) == 1:
        grouped = ((present[0], None),) if present[0] >= 0 else ()
    else:
        grouped = tuple((i, (indices == i).nonzero().squeeze(1)) for i in present if i >= 0)
    return _remember(key, (indices,), grouped)


def token_indices(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each sequence's adapter slot repeated over its tokens: what the sgmv_* ops take."""
    key = ("tokens", *_address(lora_indices), *_address(seq_lens))
    if key in _step:
        return _step[key][1]
    exploded = torch.repeat_interleave(lora_indices, seq_lens)
    return _remember(key, (lora_indices, seq_lens), exploded)


def _matrix(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """weights [L, O, I] or [L, 1, O, I] -> slot's [I, O], ready to right-multiply."""
    key = ("matrix", *_address(weights), slot, dtype)
    if key in _step:
        return _step[key][1]
    w = weights[slot]
    w = (w.squeeze(0) if w.dim() == 3 else w).t()
    return _remember(key, (weights,), w if w.dtype == dtype else w.to(dtype))


def lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], zero where indices[t] < 0.

    inputs [T, I]; weights [L, O, I] or [L, 1, O, I]; indices [T] -> [T, O] in `dtype`."""
    out = inputs.new_zeros(inputs.size(0), weights.size(-2), dtype=dtype)
    _add_products(out, inputs, weights, indices, alpha=1.0)
    return out


def _add_products(target, inputs, weights, indices, alpha: float) -> None:
    """target[t] += alpha * weights[indices[t]] @ inputs[t], in place."""
    if inputs.dtype != target.dtype:
        inputs = inputs.to(target.dtype)
    for slot, rows in groups(indices):
        w = _matrix(weights, slot, target.dtype)
        if rows is None:
            target.addmm_(inputs, w, alpha=alpha)
        else:
            target.index_add_(0, rows, inputs.index_select(0, rows) @ w, alpha=alpha)


# The ops below keep the signatures and output handling of vllm.lora.ops.torch_ops.


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    target = output_tensor[:, : lora_a_weights.size(-2)]
    target.zero_()
    _add_products(target, inputs, lora_a_weights, lora_indices_tensor, scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    # the adapter and the model may pad the output dimension differently
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset,
    slice_size,
    add_inputs=True,
):
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if not add_inputs:
        target.zero_()
    _add_products(target, inputs, lora_b_weights, lora_indices_tensor, 1.0)


# vLLM's CPU backend calls the sgmv_* ops in every step, decode included (a batch that holds a
# prefill is marked one), with per-sequence indices it expands to tokens in each call.


def _per_sequence(op, name: str):
    """vLLM's sgmv_<op>: bgmv_<op>'s arguments, with the token indices given per sequence as
    (b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches, max_seq_length, token_nums)."""

    def sgmv(inputs, weights, output, _starts, seq_lens, lora_indices, _b, _m, _t, *rest, **kw):
        op(inputs, weights, output, token_indices(lora_indices, seq_lens), *rest, **kw)

    sgmv.__name__ = name
    return sgmv


sgmv_shrink = _per_sequence(bgmv_shrink, "sgmv_shrink")
sgmv_expand = _per_sequence(bgmv_expand, "sgmv_expand")
sgmv_expand_slice = _per_sequence(bgmv_expand_slice, "sgmv_expand_slice")


OPS = (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand, sgmv_expand_slice)


def register() -> None:
    from shared.vllm_compat import cpu_lora_modules

    modules = cpu_lora_modules()
    if modules is None:
        return
    lora_ops, punica_cpu = modules
    if punica_cpu.bgmv_shrink is bgmv_shrink:
        return  # registered already in this process
    # punica_cpu imported the names from lora_ops.
    for module in (lora_ops, punica_cpu):
        for op in OPS:
            setattr(module, op.__name__, op)
    wrapper = punica_cpu.PunicaWrapperCPU
    take_mapping = wrapper.update_metadata

    def update_metadata(self, *args, **kwargs):
        take_mapping(self, *args, **kwargs)
        new_step()  # the index buffers were just refilled

    wrapper.update_metadata = update_metadata
