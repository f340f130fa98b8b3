"""LoRA learning rate x steps x rollout length: where the frozen-judge CA score of held-out
answers moves while KL and answer length stay bounded. Writes JSON.

    python bench/lora_sweep.py                                   # the configs below, SmolLM2
    python bench/lora_sweep.py --config lr=5e-4,max_new_tokens=128 --steps 36 --eval-every 12

Each config trains the real learner (CPU-sized settings, self-scored GRPO, `expected` reward) on
the shipped train prompts from the base model, in its own process. Every `--eval-every` steps
the current policy answers the evaluation prompts greedily (as users are served: no CA system
prompt, `--answer-tokens` limit) and the frozen base model scores those answers and the base's
own with the paper's reward prompt; the paired difference gets a bootstrap 95% CI. The
evaluation prompts are the gate's probe set, kept apart from both the train and held-out splits,
so choosing a default here leaves the held-out prompts untouched for `dynalign experiment`.
Results are written after every config (one stopped early keeps the points it measured),
and a rerun skips configs already in the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CONFIGS = [
    "lr=2e-4,max_new_tokens=128",
    "lr=5e-4,max_new_tokens=128",
    "lr=5e-4,max_new_tokens=48",
]


def parse_overrides(text: str) -> dict:
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {key: json.loads(value) for key, value in pairs}


def worker(
    overrides: dict, steps: int, eval_every: int, eval_prompts: int, answer_tokens: int, out: Path
) -> None:
    """Writes `out` after every evaluation: a run stopped early keeps what it measured."""
    from importlib import resources

    from learner.consumer import FilePromptSource
    from learner.loop import Learner
    from shared.config import DynalignConfig, GateConfig, LearnerConfig
    from shared.judge import bootstrap_mean_ci

    train = Path(str(resources.files("shared") / "data" / "ca_prompts" / "train.jsonl"))
    learner_cfg = LearnerConfig(**overrides, checkpoint_every_steps=10**9).cpu_sized()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DynalignConfig(learner=learner_cfg, gate={"enabled": False})
        cfg.registry.store = Path(tmp) / "adapters"
        learner = Learner(
            cfg, Path(tmp) / "learner", lambda f, o, _: FilePromptSource(train, f, o)
        ).setup()
        engine = learner.engine
        probes = GateConfig(probe_limit=eval_prompts)
        from learner.gate import probe_prompts

        chats = probe_prompts(probes)
        base_answers = engine.greedy(chats, None, answer_tokens)
        base_scores = engine.frozen_scores(chats, base_answers)
        base_words = sum(len(a.text.split()) for a in base_answers)
        trajectory, points = [], []
        started = time.perf_counter()
        while learner.step < steps:
            report = learner.step_once()
            trajectory.append(
                {"step": report.step, "reward": report.reward_mean, "kl": report.kl,
                 "tokens": report.completion_tokens, "seconds": sum(report.seconds.values()),
                 "phases_s": report.seconds}
            )  # fmt: skip
            print(json.dumps(trajectory[-1]), file=sys.stderr, flush=True)
            if report.step % eval_every and report.step != steps:
                continue
            answers = engine.greedy(chats, engine.lora, answer_tokens)
            scores = engine.frozen_scores(chats, answers)
            pairs = [
                (a, b)
                for a, b in zip(scores, base_scores, strict=True)
                if a is not None and b is not None
            ]
            diff, low, high = bootstrap_mean_ci([a - b for a, b in pairs])
            recent = trajectory[-eval_every:]
            points.append(
                {
                    "step": report.step,
                    "minutes": round((time.perf_counter() - started) / 60, 1),
                    "score": sum(a for a, _ in pairs) / len(pairs),
                    "base_score": sum(b for _, b in pairs) / len(pairs),
                    "score_diff": diff,
                    "score_diff_ci": [low, high],
                    "higher_on": sum(a > b for a, b in pairs),
                    "scored": len(pairs),
                    "identical_answers": sum(
                        a.text == b.text for a, b in zip(answers, base_answers, strict=True)
                    ),
                    "length_ratio": sum(len(a.text.split()) for a in answers) / base_words,
                    "truncated_share": sum(a.finish_reason == "length" for a in answers)
                    / len(answers),
                    "train_kl": sum(t["kl"] for t in recent) / len(recent),
                    "self_reward": sum(t["reward"] for t in recent) / len(recent),
                    "rollout_tokens": sum(t["tokens"] for t in recent) / len(recent),
                }
            )
            print(json.dumps(points[-1]), file=sys.stderr, flush=True)
            run = {
                "config": overrides,
                "settings": learner_cfg.model_dump(mode="json"),
                "steps_planned": steps,
                "points": points,
                "trajectory": trajectory,
            }
            out.write_text(json.dumps(run))  # fmt: skip
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="learner overrides, KEY=VALUE,...")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--eval-every", type=int, default=12)
    parser.add_argument("--eval-prompts", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "lora_sweep.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(
            parse_overrides(args.worker), args.steps, args.eval_every, args.eval_prompts,
            args.answer_tokens, Path(args.out),
        )  # fmt: skip

    from shared.engine import use_learner_threads

    use_learner_threads()  # the workers run in-process engines, as the learner does
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"benchmark": "lora_sweep", "runs": []}
    done.update(
        steps=args.steps,
        eval_every=args.eval_every,
        eval_prompts=args.eval_prompts,
        answer_tokens=args.answer_tokens,
    )
    for text in args.config or DEFAULT_CONFIGS:
        overrides = parse_overrides(text)
        if any(run["config"] == overrides for run in done["runs"]):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "run.json"
            worker_run = subprocess.run(
                [sys.executable, __file__, f"--worker={text}", f"--steps={args.steps}",
                 f"--eval-every={args.eval_every}", f"--eval-prompts={args.eval_prompts}",
                 f"--answer-tokens={args.answer_tokens}", f"--out={part}"],
                cwd=REPO,
            )  # fmt: skip
            if not part.exists():
                sys.exit(f"{text}: the worker measured nothing (exit {worker_run.returncode})")
            done["runs"].append(json.loads(part.read_text()))
        out.write_text(json.dumps(done, indent=2))
        for point in done["runs"][-1]["points"]:
            print(text, json.dumps(point))


if __name__ == "__main__":
    main()
