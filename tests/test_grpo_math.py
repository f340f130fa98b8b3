"""learner/grpo.py and learner/policy.py vs float64 hand computations and TRL 1.16's own code."""

from __future__ import annotations

import copy
import math
import types
from collections import defaultdict

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax

from learner.grpo import (
    collate,
    group_advantages,
    grpo_loss,
    kl_k3,
    micro_batches,
    prompt_ids,
    rollout_messages,
    token_logprobs,
    training_inputs,
)
from shared.prompts import OUTPUT_SYSTEM_PROMPT

# -----------------------------------------------------------------------------
# advantages


def _trl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    # GRPOTrainer._generate_and_score_completions, scale_rewards="group": NaN = unscorable.
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    std = nanstd(rewards, dim=1, keepdim=True)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def test_advantages_normal_group_uses_sample_std():
    r = torch.tensor([[0.0, 1.0, 3.0, 4.0, 5.0, 5.0, 2.0, 4.0]], dtype=torch.float64)
    adv = group_advantages(r, torch.ones_like(r, dtype=torch.bool))
    xs = r[0].tolist()
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    expected = [(x - mean) / (std + 1e-4) for x in xs]
    torch.testing.assert_close(adv[0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(adv, _trl_advantages(r))


def test_advantages_zero_variance_and_lone_valid_groups_are_zero():
    r = torch.tensor([[3.7] * 7 + [0.0], [1.0, 2.0, 3.0, 4.0] + [0.0] * 4])
    valid = torch.tensor([[True] * 7 + [False], [True] + [False] * 7])
    assert torch.equal(group_advantages(r, valid), torch.zeros_like(r))


def test_the_std_floor_keeps_jitter_from_becoming_gradient():
    """Near-equal expected scores (4.300 +- 0.002): advantages of +-0.9 without the floor, at
    most 0.02 with it; a group whose std is above the floor is scaled exactly as before."""
    valid = torch.ones(1, 8, dtype=torch.bool)
    jitter = torch.tensor([[4.298, 4.302] * 4], dtype=torch.float64)
    assert group_advantages(jitter, valid).abs().min() > 0.85
    assert group_advantages(jitter, valid, std_floor=0.1).abs().max() < 0.021
    spread = torch.tensor([[0.0, 1.0, 3.0, 4.0, 5.0, 5.0, 2.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(spread, valid, std_floor=0.1), group_advantages(spread, valid)
    )


def test_advantages_unparsable_candidate_excluded():
    r = torch.tensor([[1.0, 2.0, float("nan"), 4.0, 5.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    valid = ~torch.isnan(r)
    adv = group_advantages(r, valid)
    assert adv[0, 2] == 0
    xs = [x for x in r[0].tolist() if not math.isnan(x)]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    expected = torch.tensor((1.0 - mean) / (std + 1e-4), dtype=torch.float64)
    torch.testing.assert_close(adv[0, 0], expected)
    torch.testing.assert_close(adv, _trl_advantages(r))


# -----------------------------------------------------------------------------
# log-probs


def test_token_logprobs_values_and_grad():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    weights = torch.randn(2, 5, dtype=torch.float64)

    ours = token_logprobs(logits, ids)
    (ours.double() * weights).sum().backward()
    grad, logits.grad = logits.grad, None

    ref = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, selective_log_softmax(logits.float(), ids), atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# loss


def _batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # ratios spread over [0.6, 1.5]: both clip sides are hit, none sits on a boundary
    old_logp = logp - torch.empty(B, T, dtype=torch.float64).uniform_(-0.5, 0.4, generator=g)
    ref_logp = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)[:B]
    lengths = torch.tensor([6, 3, 1, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old_logp, ref_logp, adv, mask


def _hand(logp, old_logp, ref_logp, adv, mask, eps, beta):
    """Loss, d loss / d logp, kl mean, clip fraction with python floats, token by token."""
    B, T = logp.shape
    n = int(mask.sum())
    total = kl_sum = clipped = 0.0
    grad = [[0.0] * T for _ in range(B)]
    for b in range(B):
        a = float(adv[b])
        for t in range(T):
            if not mask[b, t]:
                continue
            lp, old, ref = float(logp[b, t]), float(old_logp[b, t]), float(ref_logp[b, t])
            r = math.exp(lp - old)
            rc = min(max(r, 1 - eps), 1 + eps)
            d = ref - lp
            kl = math.exp(d) - d - 1
            total += -min(r * a, rc * a) + beta * kl
            kl_sum += kl
            is_clipped = (r > 1 + eps and a > 0) or (r < 1 - eps and a < 0)
            clipped += is_clipped
            grad[b][t] = ((0.0 if is_clipped else -a * r) + beta * (1 - math.exp(d))) / n
    return total / n, torch.tensor(grad, dtype=torch.float64), kl_sum / n, clipped / n


def _trl_loss(logp, old_logp, ref_logp, adv, mask, eps, beta):
    """GRPOTrainer._compute_loss on a stub trainer: TRL's defaults from GRPOConfig, except the
    plain k3 KL (use_bias_correction_kl=False) that learner.grpo implements."""
    args = GRPOConfig(
        output_dir="/tmp/dynalign-trl-stub",
        beta=beta,
        epsilon=eps,
        use_bias_correction_kl=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
    )
    assert args.loss_type == "dapo" and args.importance_sampling_level == "token"
    B, T = logp.shape

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == T
        return logp, torch.zeros_like(logp), None

    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps,
        args=args,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=False,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x
        ),
        _metrics={"train": defaultdict(list)},
    )
    inputs = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long),
        completion_mask=mask,
        advantages=adv,
        old_per_token_logps=old_logp,
        ref_per_token_logps=ref_logp,
        num_items_in_batch=mask.sum(),
    )
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_grpo_loss_matches_hand_computation_and_trl(beta):
    eps = 0.2
    logp, old_logp, ref_logp, adv, mask = _batch()
    ours_lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(ours_lp, old_logp, ref_logp, adv, mask, eps, beta)
    loss.backward()

    h_loss, h_grad, h_kl, h_clip = _hand(logp, old_logp, ref_logp, adv, mask, eps, beta)
    assert 0 < h_clip < 1  # the batch exercises clipping
    assert loss.dtype == torch.float64
    assert abs(loss.item() - h_loss) < 1e-6
    torch.testing.assert_close(ours_lp.grad, h_grad, atol=1e-6, rtol=0)
    assert abs(stats["clip_frac"].item() - h_clip) < 1e-6
    if beta:
        assert abs(stats["kl"].item() - h_kl) < 1e-6

    trl_lp = logp.clone().requires_grad_()
    t_loss, metrics = _trl_loss(trl_lp, old_logp, ref_logp, adv, mask, eps, beta)
    t_loss.backward()
    assert abs(loss.item() - t_loss.item()) < 1e-6
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, atol=1e-6, rtol=0)
    assert abs(stats["clip_frac"].item() - metrics["clip_ratio/region_mean"][-1]) < 1e-6
    if beta:
        assert abs(stats["kl"].item() - metrics["kl"][-1]) < 1e-6


def test_kl_k3_is_zero_on_policy_and_positive_off():
    lp = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp))
    assert (kl_k3(lp, lp + torch.tensor([[0.5, -0.5]])) > 0).all()


# -----------------------------------------------------------------------------
# sequences and the policy forward (real tokenizer and tiny model)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.assets import tiny_model_dir

    path = tiny_model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Plan a week of meals for a family of four."}],
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "How do I fix a bike chain?"},
        ],
    ],
)
def test_ca_prompt_in_rollout_not_in_training_inputs(tiny, messages):
    tok, _ = tiny
    ca = tok(OUTPUT_SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]
    rollout = prompt_ids(tok, rollout_messages(messages))
    assert _contains(rollout, ca[1:-1])  # its end tokens may merge with the template's text
    assert tok.decode(rollout).count("<|im_start|>system") == 1  # merged, not a second system turn

    completion = tok("Start with a list.<|im_end|>", add_special_tokens=False)["input_ids"]
    ids, cmask = training_inputs(tok, messages, completion)
    assert not any(_contains(ids, ca[i : i + 8]) for i in range(len(ca) - 7))
    assert "Collective Agency" not in tok.decode(ids)
    assert ids == prompt_ids(tok, messages) + completion
    assert cmask == [0] * (len(ids) - len(completion)) + [1] * len(completion)
    if messages[0]["role"] == "system":
        assert rollout_messages(messages)[0]["content"].endswith("\n\nAnswer in French.")


def test_sequence_logprobs_left_padding_and_reference(tiny):
    from learner.policy import adapters_disabled, apply_lora, lora_layers, sequence_logprobs
    from shared.config import LearnerConfig

    tok, base = tiny
    examples = [([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]), ([11, 12, 13, 14, 15, 16], [0, 0, 1, 1, 1, 1])]
    batch = collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 7) and batch["completion_mask"].tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]

    def naive(model, ids, cmask):  # one unpadded row, full log_softmax
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp[len(ids) - sum(cmask) - 1 :]

    with torch.no_grad():
        base_lp = [naive(base, *ex) for ex in examples]
        model = apply_lora(base, LearnerConfig())
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter, so the reference differs from the policy
        logp = sequence_logprobs(model, **batch)
        with adapters_disabled(lora_layers(model)):
            ref = sequence_logprobs(model, **batch)
        policy_lp = [naive(model, *ex) for ex in examples]
        model.unload()  # leave the shared tiny model as it was

    for i, (_, cmask) in enumerate(examples):
        n = sum(cmask)
        torch.testing.assert_close(ref[i, :n].double(), base_lp[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(logp[i, :n].double(), policy_lp[i], atol=1e-5, rtol=0)
        assert not torch.allclose(logp[i, :n], ref[i, :n])
        assert (logp[i, n:] == 0).all() and (ref[i, n:] == 0).all()


def test_grpo_step_updates_only_the_adapter(tiny):
    from learner.policy import apply_lora, grpo_step, lora_layers, make_optimizer
    from shared.config import LearnerConfig

    tok, base = tiny
    cfg = LearnerConfig(lr=1e-3).cpu_sized()
    examples = [([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]), ([11, 12, 13, 14], [0, 1, 1, 1])] * 2
    batch = collate(examples, tok.pad_token_id)
    rewards = torch.tensor([[1.0, 4.0], [2.0, 0.0]])
    batch["advantages"] = group_advantages(rewards, torch.ones(2, 2, dtype=torch.bool)).view(4)
    model = apply_lora(base, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = grpo_step(model, lora_layers(model), make_optimizer(model, cfg), [batch], cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    model.unload()
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["kl"] == 0  # fresh adapter: B = 0, the policy is the reference


def test_micro_batches_drop_padding_and_accumulate_to_the_one_pass_step(tiny):
    from learner.policy import apply_lora, grpo_step, lora_layers
    from shared.config import LearnerConfig

    tok, base = tiny
    cfg = LearnerConfig(train_dtype="float32")  # bf16 rounding depends on the batch's shape
    # Two groups of two: 3-token prompts with short answers, 1-token prompts with longer ones.
    examples = [
        ([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]),
        ([5, 6, 7, 8], [0, 0, 0, 1]),
        ([11, 12, 13, 14, 15, 16], [0, 1, 1, 1, 1, 1]),
        ([11, 12, 13], [0, 1, 1]),
    ]
    batch = collate(examples, tok.pad_token_id)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    parts = micro_batches(batch, 2)
    assert batch["input_ids"].shape == (4, 3 + 5)
    assert [p["input_ids"].shape for p in parts] == [(2, 3 + 2), (2, 1 + 5)]
    assert parts[1]["input_ids"][0].tolist() == [11, 12, 13, 14, 15, 16]
    assert parts[1]["completion_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert parts[1]["advantages"].tolist() == [0.5, -0.5]

    def step(batches):
        torch.manual_seed(0)
        model = apply_lora(copy.deepcopy(base), cfg)
        with torch.no_grad():  # B != 0: the policy differs from the reference, KL > 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        trainable = [p for p in model.parameters() if p.requires_grad]
        stats = grpo_step(
            model, lora_layers(model), torch.optim.SGD(trainable, lr=1.0), batches, cfg
        )
        return [p.detach() for p in trainable], stats

    one_pass, one_stats = step([batch])
    accumulated, acc_stats = step(parts)
    assert one_stats["kl"] > 0
    for key in ("loss", "kl", "clip_frac", "grad_norm"):
        torch.testing.assert_close(acc_stats[key], one_stats[key], atol=1e-6, rtol=1e-5)
    for a, b in zip(accumulated, one_pass, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
