"""The gate on real components: a learner on the tiny model makes a sound candidate (a small
step), then a deliberately bad one (its LoRA weights scaled up until KL to base explodes).
Prints the registry state as one JSON line. Run as a script (vLLM needs the __main__ guard).

    python tests/gate_run.py MODEL_DIR WORKDIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from learner.consumer import FilePromptSource
    from learner.loop import Learner
    from shared.config import load_config

    model, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ["Plan my week", "How should I choose a school?"]
        )
    )
    cfg = load_config(
        model={"path": model, "max_model_len": 1024},
        learner={
            "profile": "paper",  # v1 is one small step at the paper's lr
            "max_new_tokens": 16,
            "batch_completions": 16,
            "checkpoint_every_steps": 1,
            "train_dtype": "float32",
        },
        gate={"probe_limit": 6, "max_new_tokens": 24},
        registry={"store": str(workdir / "adapters")},
    )
    learner = Learner(
        cfg,
        workdir,
        lambda prompt_filter, offsets, deferred: FilePromptSource(prompts, prompt_filter, offsets),
    ).setup()
    learner.run(max_steps=1)  # v1: one small paper-lr step from the base model

    with torch.no_grad():  # v2: the same adapter with its B matrices blown up
        for name, param in learner.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 5.0)
    learner.engine.load_policy(learner.model.save_pretrained)
    learner.step += 1
    learner.checkpoint(_report(learner))

    state = learner.lifecycle.state()
    print(
        json.dumps(
            {
                "live": state.live,
                "states": state.states,
                "gate": state.model_dump(mode="json")["gate_results"],
                "versions": learner.lifecycle.registry.versions(),
            }
        )
    )
    learner.close()


def _report(learner):
    from learner.loop import StepReport

    return StepReport(
        step=learner.step,
        reward_mean=0.0,
        reward_std=0.0,
        zero_variance_groups=0.0,
        unparsable=0,
        kl=0.0,
        loss=0.0,
        grad_norm=0.0,
        completion_tokens=0.0,
        tokens_per_s=0.0,
        seconds={},
    )


if __name__ == "__main__":
    main()
