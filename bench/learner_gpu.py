"""The training half of one GRPO step, ours (learner/) vs TRL 1.16's GRPOTrainer, on one batch.

One step = reference log-probs with the adapter off, policy log-probs, loss, backward, grad clip,
AdamW. Generation and scoring are not timed: both sides get the same precomputed completions and
advantages. Paper settings (LearnerConfig defaults): 32 completions (G=8), lr 5e-6, clip 0.2,
KL beta 0.04, T=1. Shapes: 32 x (32 prompt + 256 completion) tokens on a random-weight model
shaped like Qwen2.5-0.5B (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV heads) with a 32000
vocabulary, as measured before (the real 151936-token head would dominate a model this small);
LoRA r=16 alpha=32 on every Linear but the head; bf16 autocast, bf16 frozen base, fp32 LoRA.

Variants (--variants):
  ours          learner.policy.grpo_step: adapter off by flipping each LoRA layer's flag,
                logits only for completion columns, fp32 log-probs in chunks, no host syncs
  ours-peftref  the same, but the reference under peft's `model.disable_adapter()` context
  ours-compile  ours with torch.compile on each decoder layer
  trl           GRPOTrainer with the same settings: reference as in
                `_generate_and_score_completions` (trl.trainer.utils.use_adapter), then
                `training_step` (-> `_compute_loss`, backward), then clip + optimizer step as
                Trainer's loop does. Generation is skipped by making `_prepare_inputs` return the
                prepared inputs dict. Set like ours: loss_type "dapo" (TRL default),
                use_bias_correction_kl=False (plain k3 KL), gradient_checkpointing=False (TRL
                defaults to True; --trl-gradient-checkpointing restores it).

All prompts have the same length so positions agree (TRL passes no position_ids); both sides
start from the same base weights and the same LoRA init, so their first step's loss and grad
norm must agree, which the script checks (exactly in fp32 with --smoke, to bf16 noise on GPU).

Reported per variant: median step time over --steps timed steps after --warmup steps (each
bracketed by torch.cuda.synchronize), tokens/s over B x (P + C) positions, MFU = 6 N T / time /
989e12 (H100 SXM dense bf16 peak, no sparsity) with N the weights of every matmul (decoder
blocks + LM head: 0.386B; attention score flops not counted; with a frozen base 6NT is also the
real work: reference forward 2NT + forward 2NT + activation-only backward 2NT), peak memory.

    python bench/learner_gpu.py                # H100; writes bench/results/learner_gpu.json
    python bench/learner_gpu.py --smoke        # tiny, CPU, fp32: end-to-end check (_smoke.json)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner import policy  # noqa: E402
from learner.grpo import group_advantages  # noqa: E402
from shared.config import LearnerConfig  # noqa: E402

H100_BF16_PEAK = 989e12  # H100 SXM, dense bf16 tensor-core FLOP/s

FULL = dict(
    B=32, G=8, P=32, C=256,
    model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, vocab_size=32000),
)  # fmt: skip
SMOKE = dict(
    B=8, G=4, P=8, C=16,
    model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
)  # fmt: skip


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **shape["model"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = 1
    return model.to(dtype)


def matmul_params(model: nn.Module) -> int:
    # Every Linear of the bare model (before LoRA): q k v o gate up down per layer + the LM head.
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def make_batch(shape: dict, vocab: int, ragged: bool, device: torch.device, seed: int) -> dict:
    """Token ids (pad 0, eos 1 excluded from content), masks and advantages, in both layouts."""
    B, G, P, C = shape["B"], shape["G"], shape["P"], shape["C"]
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, vocab, (B, P), generator=g)
    completion_ids = torch.randint(2, vocab, (B, C), generator=g)
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g) if ragged else torch.full((B,), C)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    rewards = torch.randint(0, 6, (B // G, G), generator=g).float()
    valid = torch.rand(B // G, G, generator=g) > 0.05  # a few unparsable scores
    batch = dict(
        input_ids=torch.cat([prompt_ids, completion_ids], 1),
        attention_mask=torch.cat([torch.ones_like(prompt_ids), completion_mask], 1),
        completion_mask=completion_mask,
        advantages=group_advantages(rewards, valid).view(B),
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        completion_ids=completion_ids,
    )
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[dict, list[float]]:
    """Run `step` warmup + steps times; returns the first step's stats (as floats) and timings."""
    first = {k: float(v) for k, v in step().items()}
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, times


def run_ours(variant, shape, cfg, batch, device, dtype, args, lora_init):
    model = policy.apply_lora(build_model(shape, device, dtype, args.seed), cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_init.update({n: p.detach().clone() for n, p in trainable.items()})
    layers = policy.lora_layers(model)
    optimizer = policy.make_optimizer(model, cfg)
    if variant == "ours-compile":
        # One compiled graph per layer kind and adapter state; 24 layers + the reference's
        # adapter-off state exceed dynamo's default cache of 8 entries per code object.
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 1024
        for layer in model.base_model.model.model.layers:
            layer.compile()
    if variant == "ours-peftref":
        # Benchmark-only: time grpo_step with peft's context manager for the reference pass.
        fast, policy.adapters_disabled = policy.adapters_disabled, lambda _: model.disable_adapter()
    model.train()
    try:
        return timed(
            lambda: policy.grpo_step(model, layers, optimizer, [batch], cfg),
            device,
            args.warmup,
            args.steps,
        )
    finally:
        if variant == "ours-peftref":
            policy.adapters_disabled = fast


def run_trl(shape, cfg, batch, device, dtype, args, lora_init):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    # The trainer reads only pad/eos ids from its tokenizer when it does not generate.
    word = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word, pad_token="<pad>", eos_token="<eos>")
    B, C = shape["B"], shape["C"]
    targs = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        num_generations=shape["G"],
        max_completion_length=C,
        learning_rate=cfg.lr,
        beta=cfg.kl_beta,
        epsilon=cfg.clip_eps,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_grad_norm=cfg.max_grad_norm,
        use_bias_correction_kl=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        report_to="none",
        seed=args.seed,
    )

    def zero_reward(completions, **kwargs):  # never called: generation is skipped
        return [0.0] * len(completions)

    trainer = GRPOTrainer(
        model=build_model(shape, device, dtype, args.seed),
        reward_funcs=zero_reward,
        args=targs,
        train_dataset=Dataset.from_dict({"prompt": ["-"] * B}),
        processing_class=tokenizer,
        peft_config=policy.lora_config(cfg),
    )
    model = trainer.model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in lora_init.items():  # same LoRA init as ours
            params[name].copy_(value)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
    trainer._prepare_inputs = lambda inputs: inputs  # completions are given: no generation
    ids, am = batch["input_ids"], batch["attention_mask"]

    def step() -> dict:
        inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids")}
        inputs["completion_mask"] = batch["completion_mask"]
        inputs["advantages"] = batch["advantages"]
        inputs["num_items_in_batch"] = batch["completion_mask"].sum()
        # GRPOTrainer._generate_and_score_completions, beta != 0, PEFT without a "ref" adapter
        no_ckpt = disable_gradient_checkpointing(model, targs.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_ckpt:
            with use_adapter(trainer.accelerator.unwrap_model(model), adapter_name=None):
                ref, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, ids, am, C, batch_size=targs.per_device_train_batch_size
                )
        inputs["ref_per_token_logps"] = ref
        loss = trainer.training_step(model, inputs, inputs["num_items_in_batch"])
        # Trainer._inner_training_loop after the accumulation window
        grad_norm = trainer.accelerator.clip_grad_norm_(model.parameters(), targs.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad()
        return {"loss": loss, "grad_norm": grad_norm}

    return timed(step, device, args.warmup, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32")
    parser.add_argument("--variants", default="ours,ours-peftref,ours-compile,trl")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, help="default bench/results/learner_gpu[_smoke].json")
    args = parser.parse_args()
    suffix = "_smoke" if args.smoke else ""
    args.out = args.out or Path(__file__).parent / "results" / f"learner_gpu{suffix}.json"

    if args.smoke:
        shape, device, dtype = SMOKE, torch.device("cpu"), torch.float32
        cfg = LearnerConfig(batch_completions=SMOKE["B"], group_size=SMOKE["G"]).cpu_sized()
        args.warmup, args.steps = min(args.warmup, 2), min(args.steps, 3)
    else:
        assert torch.cuda.is_available(), "the full benchmark needs a GPU; use --smoke on CPU"
        shape, device, dtype = FULL, torch.device("cuda"), torch.bfloat16
        cfg = LearnerConfig(max_new_tokens=FULL["C"])
    cfg = cfg.model_copy(update=dict(batch_completions=shape["B"], group_size=shape["G"]))
    B, P, C = shape["B"], shape["P"], shape["C"]
    n_matmul = matmul_params(build_model(shape, torch.device("meta"), dtype, args.seed))
    batch = make_batch(shape, shape["model"]["vocab_size"], args.smoke, device, args.seed)
    tokens = B * (P + C)

    lora_init: dict[str, torch.Tensor] = {}
    results = {}
    for variant in args.variants.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if variant == "trl":
                assert lora_init, "run an ours* variant first: TRL copies its LoRA init"
                first, times = run_trl(shape, cfg, batch, device, dtype, args, lora_init)
            else:
                first, times = run_ours(variant, shape, cfg, batch, device, dtype, args, lora_init)
        except Exception as e:  # one failing variant (e.g. compile) must not lose the others
            results[variant] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{variant}: FAILED {results[variant]['error']}", flush=True)
            continue
        finally:
            gc.collect()
        median = statistics.median(times)
        results[variant] = dict(
            median_s=median,
            min_s=min(times),
            times_s=times,
            tokens_per_s=tokens / median,
            completion_tokens_per_s=int(batch["completion_mask"].sum()) / median,
            mfu=6 * n_matmul * tokens / median / H100_BF16_PEAK,
            peak_mem_gib=(
                torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            ),
            first_step=first,
        )
        r = results[variant]
        print(
            f"{variant:13s} {median * 1e3:8.1f} ms/step  {r['tokens_per_s']:9.0f} tok/s  "
            f"MFU {r['mfu']:.1%}  peak {r['peak_mem_gib'] or 0:.2f} GiB  "
            f"loss0 {first['loss']:+.6f}  gnorm0 {first['grad_norm']:.6f}",
            flush=True,
        )

    report = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        smoke=args.smoke,
        torch=torch.__version__,
        shape=dict(B=B, G=shape["G"], prompt=P, completion=C, **shape["model"]),
        matmul_params=n_matmul,
        peak_flops=H100_BF16_PEAK,
        learner=cfg.model_dump(),
        warmup=args.warmup,
        steps=args.steps,
        results=results,
    )
    ours, trl = results.get("ours", {}), results.get("trl", {})
    if "median_s" in ours and "median_s" in trl:
        report["trl_over_ours"] = trl["median_s"] / ours["median_s"]
        a, b = ours["first_step"], trl["first_step"]
        report["first_step_agreement"] = {
            k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("loss", "grad_norm")
        }
        print(f"TRL / ours step time: {report['trl_over_ours']:.2f}x; "
              f"first-step relative diff: {report['first_step_agreement']}")  # fmt: skip
        if args.smoke:  # fp32, same weights and init: the two must compute the same step
            assert max(report["first_step_agreement"].values()) < 1e-4, report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
