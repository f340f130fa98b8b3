"""The learner's update memory: peak RSS of one GRPO optimiser step on SmolLM2 (CPU, float32,
the CPU-sized step: 16 completions of 128 tokens after a 120-token prompt) per micro-batch size,
with and without gradient checkpointing. Each setting runs in a fresh process (peak RSS is per
process). Writes bench/results/learner_memory.json.

    python bench/learner_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(8, False), (4, False), (2, False), (1, False), (8, True), (4, True)]
PROMPT, COMPLETION, BATCH = 120, 128, 16


def measure(micro_batch: int, checkpointing: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from shared.engine import use_learner_threads

    use_learner_threads()
    import torch
    from transformers import AutoModelForCausalLM

    from learner.grpo import micro_batches
    from learner.policy import apply_lora, grpo_step, lora_layers, make_optimizer
    from shared.assets import smollm2_dir
    from shared.config import LearnerConfig

    lc = LearnerConfig().cpu_sized().model_copy(update={"micro_batch_completions": micro_batch})
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_lora(model, lc)
    layers, optimizer = lora_layers(model), make_optimizer(model, lc)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    T = PROMPT + COMPLETION
    batch = {
        "input_ids": torch.randint(0, 49000, (BATCH, T)),
        "attention_mask": torch.ones(BATCH, T, dtype=torch.long),
        "completion_mask": torch.ones(BATCH, COMPLETION, dtype=torch.long),
        "advantages": torch.randn(BATCH),
    }
    model.train()
    started = time.perf_counter()
    for _ in range(2):
        grpo_step(model, layers, optimizer, micro_batches(batch, micro_batch), lc)
    return {
        "micro_batch_completions": micro_batch,
        "gradient_checkpointing": checkpointing,
        "rss_before_step_gib": before / 2**20,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "seconds_per_step": (time.perf_counter() - started) / 2,
    }


def main() -> None:
    if len(sys.argv) == 3:  # one setting, in its own process
        print(json.dumps(measure(int(sys.argv[1]), sys.argv[2] == "1")))
        return
    results = []
    for micro_batch, checkpointing in SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, str(micro_batch), str(int(checkpointing))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    path = REPO / "bench" / "results" / "learner_memory.json"
    path.write_text(
        json.dumps(
            {"benchmark": "learner_memory", "batch_completions": BATCH, "results": results},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
