"""A learner on the tiny model for the lineage tests: setup(), STEPS steps with a checkpoint (and
a gate verdict) after each, then its training weights saved to OUT and the registry state printed
as one JSON line. STEPS 0 shows where a restart would train from. Run as a script (vLLM spawns
workers: needs the __main__ guard).

    python tests/lineage_run.py MODEL_DIR WORKDIR STORE STEPS pass|reject OUT.safetensors

`reject` sets the gate's KL limit below zero, so every candidate fails it; `pass` opens every
limit. DYNALIGN_LEARNER_CRASH_AT=before-verdict kills the run between publish and verdict.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GATES = {
    "reject": {"max_kl": -1.0},
    "pass": {
        "score_margin": 1e9,
        "max_kl": 1e9,
        "max_length_ratio": 1e9,
    },
}


def main() -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from learner.consumer import FilePromptSource
    from learner.loop import Learner
    from shared.config import load_config

    model, workdir, store, steps, gate, out = sys.argv[1:7]
    workdir = Path(workdir)
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
            "max_new_tokens": 8,
            "batch_completions": 16,
            "checkpoint_every_steps": 1,
            "train_dtype": "float32",
            "lora_rank": 8,
            "max_user_share": 1.0,
        },
        gate={"probe_limit": 2, "max_new_tokens": 8, "ifeval_prompts": 0, **GATES[gate]},
        registry={"store": store},
    )
    learner = Learner(
        cfg,
        workdir,
        lambda prompt_filter, offsets, deferred: FilePromptSource(prompts, prompt_filter, offsets),
    )
    try:
        learner.setup()
        learner.run(max_steps=learner.step + int(steps))
        weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(learner.model).items()}
        save_file(weights, out)
        state = learner.lifecycle.state()
        registry = learner.lifecycle.registry
        print(
            json.dumps(
                {
                    "live": state.live,
                    "states": state.states,
                    "gate": state.model_dump(mode="json")["gate_results"],
                    "parent_version": learner.parent_version,
                    "run_id": learner.candidates.run_id,
                    "lineage": {v: registry.manifest(v).lineage for v in registry.versions()},
                }
            )
        )
    finally:
        learner.close()


if __name__ == "__main__":
    main()
