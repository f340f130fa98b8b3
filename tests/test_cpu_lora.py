"""serving/cpu_lora.py: vLLM's CPU LoRA ops grouped by adapter give the per-token products."""

from __future__ import annotations

import pytest
import torch

from serving import cpu_lora


def _per_token(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # vLLM's torch ops, spelled out: each token's matrix gathered, then an einsum; -1 = no adapter.
    out = torch.einsum("ti,toi->to", x, w[idx.clamp(min=0)])
    return out.masked_fill((idx < 0)[:, None], 0.0)


@pytest.mark.parametrize("indices", [[2, 2, 2, 2, 2], [0, 2, -1, 0, 1], [-1, -1, -1, -1, -1]])
def test_grouped_products_equal_per_token_ones(indices):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 6, generator=g), torch.randn(3, 1, 4, 6, generator=g)  # [T,I], [L,1,O,I]
    idx = torch.tensor(indices)
    expected = _per_token(x, w.squeeze(1), idx)
    torch.testing.assert_close(cpu_lora.lora_matmul(x, w, idx, torch.float32), expected)

    shrunk = torch.full((5, 4), 7.0)  # overwritten, scaled
    cpu_lora.bgmv_shrink(x, w, shrunk, idx, scaling=0.5)
    torch.testing.assert_close(shrunk, 0.5 * expected)
    wide = torch.ones(5, 10)  # the slice [3, 7) gets the products added
    cpu_lora.bgmv_expand_slice(x, w, wide, idx, 3, 4, add_inputs=True)
    torch.testing.assert_close(wide[:, 3:7], 1 + expected)
    assert (wide[:, :3] == 1).all() and (wide[:, 7:] == 1).all()
    padded = torch.zeros(5, 3)  # the model's output narrower than the adapter's: cut
    cpu_lora.bgmv_expand(x, w, padded, idx, add_inputs=False)
    torch.testing.assert_close(padded, expected[:, :3])


def test_prefill_ops_expand_sequences_to_tokens():
    """The sgmv_* ops (vLLM's CPU backend calls them in every step) take one adapter slot per
    sequence and its length: the products are the per-token ones of the expanded slots."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 5, generator=g), torch.randn(2, 1, 3, 5, generator=g)
    slots, lens = torch.tensor([1, -1, 0]), torch.tensor([3, 1, 2])
    expected = _per_token(x, w.squeeze(1), torch.tensor([1, 1, 1, -1, 0, 0]))
    metadata = (torch.tensor([0, 3, 4]), lens, slots, 3, 3, 6)
    shrunk = torch.full((6, 3), 7.0)
    cpu_lora.sgmv_shrink(x, w, shrunk, *metadata, 2.0)
    torch.testing.assert_close(shrunk, 2 * expected)
    wide = torch.ones(6, 5)
    cpu_lora.sgmv_expand_slice(x, w, wide, *metadata, 1, 3, True)
    torch.testing.assert_close(wide[:, 1:4], 1 + expected)


def test_a_refilled_index_buffer_is_grouped_anew_after_new_step():
    """The grouping is kept per step: vLLM refills its index buffers in place when it takes a
    new batch's mapping, and the wrapper's update_metadata calls new_step."""
    x, w = torch.ones(2, 2), torch.stack([torch.eye(2), 2 * torch.eye(2)])
    buffer = torch.tensor([0, 0])
    torch.testing.assert_close(cpu_lora.lora_matmul(x, w, buffer, torch.float32), x)
    buffer.copy_(torch.tensor([1, -1]))
    cpu_lora.new_step()
    torch.testing.assert_close(
        cpu_lora.lora_matmul(x, w, buffer, torch.float32), torch.tensor([[2.0, 2.0], [0, 0]])
    )


def _prompt_logprobs(output) -> list[float]:
    return [next(iter(d.values())).logprob for d in output.prompt_logprobs[1:]]


@pytest.mark.slow
def test_engine_runs_the_grouped_ops_and_matches_peft(tiny_model, tmp_path):
    """A random adapter through vLLM gives PEFT's log-probs, and a request without adapter in
    the same batch gives the base model's, though the adapter holds the engine's last slot
    (vLLM's own CPU ops apply it to that request too: this fails without the plugin)."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from learner.policy import apply_lora
    from shared.config import LearnerConfig, ModelConfig
    from shared.engine import engine_kwargs

    torch.manual_seed(0)
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LearnerConfig())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")

    prompt = list(range(40, 90))
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
        peft_logprobs = logits.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
        with peft_model.disable_adapter():
            logits = peft_model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
        base_logprobs = logits.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)

    # Our own engine settings (CPU KV-cache size included), not vLLM's bare defaults.
    llm = LLM(**engine_kwargs(ModelConfig(path=str(tiny_model), max_loras=1, max_model_len=256)))
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        adapter = LoRARequest("random", 1, str(tmp_path / "adapter"))
        # One batch: the same prompt without adapter, then with it.
        without, with_adapter = llm.generate(
            [{"prompt_token_ids": prompt}] * 2, params, lora_request=[None, adapter], use_tqdm=False
        )
        torch.testing.assert_close(
            torch.tensor(_prompt_logprobs(with_adapter)), peft_logprobs, atol=2e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(_prompt_logprobs(without)), base_logprobs, atol=2e-4, rtol=0
        )
        assert (peft_logprobs - base_logprobs).abs().max() > 0.1  # the adapter matters

        # Decoding, batches change mapping step by step (a step's grouping is kept until the
        # next mapping): each request decodes what it decodes alone, the order swapped.
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        prompt = [{"prompt_token_ids": list(range(300, 340))}]
        alone = [
            llm.generate(prompt, greedy, lora_request=r, use_tqdm=False)[0].outputs[0].token_ids
            for r in (adapter, None)
        ]
        together = llm.generate(prompt * 2, greedy, lora_request=[adapter, None], use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in together] == [list(a) for a in alone]
        assert alone[0] != alone[1]
    finally:
        llm.llm_engine.engine_core.shutdown()
