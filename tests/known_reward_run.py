"""A bounded learner run on the tiny model with a known reward in place of the self-reward:
the share of completion tokens whose id is a multiple of 8 (about 1/8 by chance). Writes each
step's report as JSON lines. Run as a script (vLLM spawns workers: needs the __main__ guard).

    python tests/known_reward_run.py MODEL_DIR WORKDIR STEPS OUT.jsonl
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def known_reward(conversations, candidates):
    return [
        [sum(t % 8 == 0 for t in c.token_ids) / max(1, len(c.token_ids)) for c in group]
        for group in candidates
    ]


def main() -> None:
    from learner.consumer import FilePromptSource
    from learner.loop import Learner
    from shared.config import load_config

    model, workdir, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    prompts = workdir / "prompts.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ["Plan my week", "hello", "What is a path?", "Write a note"]
        )
    )
    cfg = load_config(
        # 1024: the learner only takes prompts whose judge prompt fits too (~670 tokens here),
        # whether or not this run judges with the policy.
        model={"path": model, "max_model_len": 1024},
        # A high learning rate and no KL: the test asks whether the loop learns at all, fast.
        learner={
            "lr": 2e-2,
            "kl_beta": 0.0,
            "max_new_tokens": 16,
            "batch_completions": 32,
            "checkpoint_every_steps": 1000,
            "train_dtype": "float32",
            "lora_rank": 8,
        },
        registry={"store": str(workdir / "adapters")},
    )
    learner = Learner(
        cfg,
        workdir,
        lambda prompt_filter, offsets, deferred: FilePromptSource(prompts, prompt_filter, offsets),
        reward_fn=known_reward,
    ).setup()
    with open(out, "w") as f:
        learner.run(
            max_steps=steps, on_step=lambda r: f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        )
    learner.close()


if __name__ == "__main__":
    main()
