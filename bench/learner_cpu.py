"""One full GRPO step on CPU (rollout + self-reward + update), dynalign's learner vs TRL 1.16's
GRPOTrainer, in one run on the same model, prompts, batch and settings.

Both sides: SmolLM2-135M-Instruct in float32, 32 completions per optimiser step (4 probe prompts
x G=8, the same prompts in the same order) in forward/backward passes of 8, up to 256 new tokens
at T=1, top_p=1, LoRA r=16 alpha=32 on all linear layers, AdamW lr 5e-6 (constant), clip 0.2,
KL beta 0.04 (plain k3), self-reward by the policy with the paper's reward prompt in the same
mode (--reward-mode).

  dynalign  learner.loop.Learner.step_once(): vLLM rollouts (CA system prompt in front), vLLM
            self-scores, learner.policy.grpo_step on the prompt WITHOUT the system prompt, then
            the adapter is saved and reloaded into vLLM. Phases come from its StepReport.
  TRL       GRPOTrainer with HF generation (use_vllm=False) on the same conversations WITH the
            system prompt (kept in its loss), and a reward function that scores with the
            trainer's own model: "expected" = one forward pass over the batch reading the
            probabilities of "0".."5" at the answer position (renormalised, weighted mean);
            "greedy" = HF greedy generate of up to 8 tokens, parsed by shared.reward.parse_score.
            Step time from on_step_begin to on_step_end; generation and reward time by wrapping
            GRPOTrainer._generate_single_turn and ._calculate_rewards; the rest is the update.

Each side runs 1 warm-up step then --steps timed steps. tokens/s = completion tokens generated
per second of whole step (and per second of generation alone).

    python bench/learner_cpu.py                    # writes bench/results/learner_cpu.json
    python bench/learner_cpu.py --reward-mode greedy --steps 3
    python bench/learner_cpu.py --smoke            # tiny model, 16 completions x 16 tokens
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# 8 completions per forward/backward: 32 at once need ~21 GB of activations in float32.
FULL = dict(
    batch_completions=32,
    micro_batch_completions=8,
    group_size=8,
    max_new_tokens=256,
    max_model_len=4096,
)
SMOKE = dict(
    batch_completions=16,
    micro_batch_completions=8,
    group_size=8,
    max_new_tokens=16,
    max_model_len=2048,
)
JUDGE_MAX_TOKENS = 8  # greedy mode: what Engine.self_scores generates too


def learner_settings(shape: dict, reward_mode: str) -> dict:
    return dict(
        batch_completions=shape["batch_completions"],
        group_size=shape["group_size"],
        micro_batch_completions=shape["micro_batch_completions"],
        max_new_tokens=shape["max_new_tokens"],
        lora_rank=16,
        lora_alpha=32,
        lr=5e-6,
        kl_beta=0.04,
        clip_eps=0.2,
        temperature=1.0,
        top_p=1.0,
        train_dtype="float32",
        reward_mode=reward_mode,
        checkpoint_every_steps=10**9,
    )


def summarize(steps: list[dict], phases: list[str]) -> dict:
    """Medians and throughput over the timed steps (warm-up excluded)."""
    wall = [s["step_s"] for s in steps]
    tokens = sum(s["completion_tokens"] for s in steps)
    return dict(
        median_step_s=statistics.median(wall),
        phases_median_s={p: statistics.median(s["phases_s"][p] for s in steps) for p in phases},
        phase_share={p: sum(s["phases_s"][p] for s in steps) / sum(wall) for p in phases},
        completion_tokens_per_s=tokens / sum(wall),
        generation_tokens_per_s=tokens / sum(s["phases_s"]["rollout"] for s in steps),
        mean_completion_tokens=tokens / sum(s["completions"] for s in steps),
    )


# -- dynalign -----------------------------------------------------------------------------------
def run_dynalign(model_dir: str, shape: dict, args, prompts_file: Path, workdir: Path) -> dict:
    import torch

    from learner.consumer import FilePromptSource
    from learner.loop import Learner
    from shared.config import load_config

    cfg = load_config(
        model={"path": model_dir, "max_model_len": shape["max_model_len"]},
        learner=learner_settings(shape, args.reward_mode),
        gate={"enabled": False},
        registry={"store": str(workdir / "adapters")},
    )
    learner = Learner(
        cfg,
        workdir,
        lambda prompt_filter, offsets, deferred: FilePromptSource(
            prompts_file, prompt_filter, offsets
        ),
    ).setup()
    threads = torch.get_num_threads()
    steps = []
    try:
        for _ in range(1 + args.steps):
            t0 = time.perf_counter()
            report = learner.step_once()
            wall = time.perf_counter() - t0
            n = shape["batch_completions"]
            steps.append(
                dict(
                    step_s=wall,
                    # "batch" (reading the prompt file) is ~0 and counted in the step only
                    phases_s={
                        "rollout": report.seconds["rollout"],
                        "reward": report.seconds["reward"],
                        "update": report.seconds["update"],
                    },
                    completions=n,
                    completion_tokens=round(report.completion_tokens * n),
                    reward_mean=report.reward_mean,
                    unparsable=report.unparsable,
                    loss=report.loss,
                    kl=report.kl,
                )
            )
            print(f"dynalign step {len(steps)}: {wall:.1f} s {steps[-1]['phases_s']}", flush=True)
    finally:
        learner.close()  # ends vLLM's engine: it must neither hold memory nor share cores with TRL
        del learner
        gc.collect()
    return dict(
        warmup=steps[0],
        steps=steps[1:],
        torch_threads=threads,
        **summarize(steps[1:], ["rollout", "reward", "update"]),
    )


# -- TRL ----------------------------------------------------------------------------------------
def judge_scores(model, tokenizer, requests: list, mode: str, digit_ids: list[int]) -> list:
    """The policy scores each judge request 0-5 as Engine.self_scores does, with HF."""
    import torch
    from transformers import GenerationConfig

    from learner.grpo import prompt_ids
    from shared.reward import expected_score, parse_score

    ids = [prompt_ids(tokenizer, r) for r in requests]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        if mode == "expected":
            # Left padding: positions must count real tokens only, as vLLM's do.
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=1,
                use_cache=False,
            )
            logp = out.logits[:, -1, digit_ids].float().log_softmax(-1)  # renormalised over 0..5
            return [
                expected_score({str(d): lp for d, lp in enumerate(row)}) for row in logp.tolist()
            ]
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=GenerationConfig(
                max_new_tokens=JUDGE_MAX_TOKENS,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            ),
        )
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [parse_score(t) for t in texts]


def run_trl(model_dir: str, shape: dict, args, conversations: list, outdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from learner.grpo import rollout_messages
    from learner.policy import lora_config
    from learner.rollout import judge_request
    from shared.config import LearnerConfig

    lc = LearnerConfig(**learner_settings(shape, args.reward_mode))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    digit_ids = [tokenizer.encode(d, add_special_tokens=False)[0] for d in "012345"]
    trainer = None  # the reward function reads the trainer's model, set once it exists

    def self_reward(prompts, completions, **_):
        # prompts[i][0] is the CA system prompt; the judge sees the user's conversation only,
        # as dynalign's self_scores does.
        requests = [
            judge_request(p[1:], c[-1]["content"])
            for p, c in zip(prompts, completions, strict=True)
        ]
        return judge_scores(trainer.model, tokenizer, requests, args.reward_mode, digit_ids)

    config = GRPOConfig(
        output_dir=str(outdir),
        # TRL counts completions; it generates for the whole accumulated batch at once.
        per_device_train_batch_size=lc.micro_batch_completions,
        gradient_accumulation_steps=lc.batch_completions // lc.micro_batch_completions,
        num_generations=lc.group_size,
        max_completion_length=lc.max_new_tokens,
        learning_rate=lc.lr,
        lr_scheduler_type="constant",  # as dynalign's AdamW (TRL's default decays linearly)
        beta=lc.kl_beta,
        epsilon=lc.clip_eps,
        use_bias_correction_kl=False,  # plain k3 KL, as dynalign (same cost either way)
        temperature=lc.temperature,
        top_p=lc.top_p,
        max_grad_norm=lc.max_grad_norm,
        use_vllm=False,
        gradient_checkpointing=False,  # TRL defaults to True; dynalign does not recompute
        bf16=False,  # TRL defaults to True; float32 as dynalign's train_dtype on CPU
        use_cpu=True,
        shuffle_dataset=False,  # the same prompts in the same order as FilePromptSource
        max_steps=1 + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=lc.seed,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=self_reward,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": rollout_messages(c)} for c in conversations]),
        processing_class=tokenizer,
        peft_config=lora_config(lc),  # r=16, alpha=32, "all-linear", as dynalign's adapter
        callbacks=[timer],
    )
    timer.wrap(trainer)
    threads = torch.get_num_threads()
    trainer.train()
    steps = timer.steps
    return dict(
        warmup=steps[0],
        steps=steps[1:],
        torch_threads=threads,
        logs=timer.logs,
        **summarize(steps[1:], ["rollout", "reward", "update"]),
    )


class StepTimer(TrainerCallback):
    """Times each optimiser step, and the generation and reward inside it."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.logs: list[dict] = []

    def wrap(self, trainer) -> None:
        generate, rewards = trainer._generate_single_turn, trainer._calculate_rewards

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = generate(*a, **kw)
            self.current["rollout"] += time.perf_counter() - t0
            self.current["tokens"] += sum(len(ids) for ids in completion_ids)
            self.current["completions"] += len(completion_ids)
            return completion_ids, logprobs

        def timed_rewards(*a, **kw):
            t0 = time.perf_counter()
            out = rewards(*a, **kw)
            self.current["reward"] += time.perf_counter() - t0
            return out

        trainer._generate_single_turn = timed_generate
        trainer._calculate_rewards = timed_rewards

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = dict(rollout=0.0, reward=0.0, tokens=0, completions=0)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        wall = time.perf_counter() - self.t0
        c = self.current
        # "update": everything else in the step (tokenising, reference log-probs with the
        # adapter off, forward + backward, clip, AdamW)
        phases = dict(
            rollout=c["rollout"], reward=c["reward"], update=wall - c["rollout"] - c["reward"]
        )
        self.steps.append(
            dict(
                step_s=wall,
                phases_s=phases,
                completions=c["completions"],
                completion_tokens=c["tokens"],
            )
        )
        print(f"TRL step {len(self.steps)}: {wall:.1f} s {phases}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 16 completions, 16 new tokens, 1 timed step",
    )
    parser.add_argument(
        "--reward-mode",
        choices=["expected", "greedy"],
        default="expected",
        help="self-reward reading on both sides (the paper's is greedy)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps after 1 warm-up step")
    parser.add_argument("--sides", default="dynalign,trl")
    parser.add_argument("--model", default="", help="default SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, help="default bench/results/learner_cpu[_smoke].json")
    args = parser.parse_args()

    import torch
    import transformers
    import trl
    import vllm

    from learner.gate import probe_prompts
    from shared.assets import smollm2_dir, tiny_model_dir
    from shared.config import GateConfig

    if args.smoke:
        shape, args.steps = SMOKE, 1
        model_dir = args.model or str(tiny_model_dir())
    else:
        shape, model_dir = FULL, args.model or str(smollm2_dir())
    suffix = "_smoke" if args.smoke else ""
    args.out = args.out or REPO / "bench" / "results" / f"learner_cpu{suffix}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    conversations = probe_prompts(GateConfig())

    report = dict(
        benchmark="learner_cpu",
        smoke=args.smoke,
        model=model_dir,
        settings=dict(
            learner_settings(shape, args.reward_mode),
            prompts=len(conversations),
            warmup_steps=1,
            timed_steps=args.steps,
            max_model_len=shape["max_model_len"],
            lora_target_modules="all-linear",
            loss_type="dapo (TRL default)",
            judge_max_tokens_greedy=JUDGE_MAX_TOKENS,
        ),
        machine=dict(
            cpu_count=os.cpu_count(),
            affinity=len(os.sched_getaffinity(0)),
            platform=platform.platform(),
            processor=platform.processor(),
            loadavg_start=os.getloadavg(),
        ),
        versions=dict(
            torch=torch.__version__,
            transformers=transformers.__version__,
            trl=trl.__version__,
            vllm=vllm.__version__,
        ),
        note=(
            "Same process, sides run one after the other (dynalign first; its vLLM engine is "
            "shut down before TRL starts). The machine is shared with other work (see loadavg), "
            "so times are indicative, not controlled. Completions are sampled, so lengths "
            "differ between sides: compare tokens/s as well as step time. TRL keeps the CA "
            "system prompt in the sequence its loss sees while dynalign removes it (paper), so "
            "TRL's update runs on longer sequences. dynalign's 'update' includes saving the "
            "adapter and reloading it into vLLM; TRL's 'update' is the step minus generation "
            "and reward (tokenising, reference log-probs, forward/backward, AdamW). TRL's "
            "reward function left-pads all of a step's judge prompts into one HF batch; unparsable "
            "scores are None on both sides (TRL's NaN handling differs from dynalign's group "
            "statistics; no effect on timing)."
        ),
    )

    def write() -> None:
        report["machine"]["loadavg_now"] = os.getloadavg()
        dyn, ref = report.get("dynalign", {}), report.get("trl", {})
        if "median_step_s" in dyn and "median_step_s" in ref:
            report["trl_over_dynalign"] = ref["median_step_s"] / dyn["median_step_s"]
        args.out.write_text(json.dumps(report, indent=2, default=float))

    with tempfile.TemporaryDirectory(prefix="learner-cpu-") as tmp:
        tmp = Path(tmp)
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
        for side in args.sides.split(","):
            try:
                if side == "dynalign":
                    report[side] = run_dynalign(model_dir, shape, args, prompts_file, tmp / "dyn")
                elif side == "trl":
                    report[side] = run_trl(model_dir, shape, args, conversations, tmp / "trl")
                else:
                    raise ValueError(f"unknown side {side!r}")
            except Exception as e:  # keep what the other side measured
                report[side] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{side}: FAILED {report[side]['error']}", flush=True)
            write()

    print(
        f"\nreward mode {args.reward_mode}; {shape['batch_completions']} completions, "
        f"<= {shape['max_new_tokens']} new tokens; median of {args.steps} step(s)"
    )
    for side in ("dynalign", "trl"):
        r = report.get(side, {})
        if "median_step_s" in r:
            phases = ", ".join(f"{p} {s:.1f} s" for p, s in r["phases_median_s"].items())
            print(
                f"{side:9s} {r['median_step_s']:7.1f} s/step ({phases}); "
                f"{r['completion_tokens_per_s']:.1f} completion tok/s per step, "
                f"{r['generation_tokens_per_s']:.1f} tok/s generating"
            )
    if "trl_over_dynalign" in report:
        print(f"TRL / dynalign step time: {report['trl_over_dynalign']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
