"""What a user's decode step costs on vLLM's CPU backend, on the bare model and on an adapter,
alone and beside the learner's rollouts: vLLM's own LoRA ops against serving/cpu_lora.py's, in
one run, each arm in a fresh process (SmolLM2-135M, `up`'s engine settings, a random rank-16
adapter on every linear layer).

Per arm and round: a user's 32-token greedy request started once the learner's sequences
(n of them, temperature 1, their prompt ~300 tokens as the CA system prompt makes it) are
decoding; the user's latency and the median wall time of the engine steps it took.

    python bench/cpu_lora_steps.py            # writes bench/results/cpu_lora_steps.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {  # name -> VLLM_PLUGINS (None: every installed plugin, dynalign's included)
    "vllm-ops": "none-such",  # vLLM loads no plugin: its torch ops
    "dynalign-ops": None,
}
ROUNDS = 2
# (case, learner sequences beside the user, the learner on an adapter, the user on an adapter)
CASES = [
    ("user alone, base", 0, False, False),
    ("user alone, adapter", 0, False, True),
    ("beside 8 base sequences", 8, False, False),
    ("beside 8 adapter sequences", 8, True, False),
    ("on an adapter, beside 8 of another", 8, True, True),
]
USER = [{"role": "user", "content": "Give me one tip for sleeping better."}]
LEARNER = [
    {"role": "system", "content": "You are a helpful assistant. " * 40},
    {"role": "user", "content": "How can neighbours share tools without losing them?"},
]


def measure(adapter_dir: str) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from shared.config import ModelConfig
    from shared.engine import engine_kwargs

    kwargs = engine_kwargs(ModelConfig())
    kwargs["kv_cache_memory_bytes"] = 2**29  # as `up` sets it
    llm = LLM(**kwargs)
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    user_adapter, learner_adapter = (
        LoRARequest(n, i, adapter_dir) for i, n in [(1, "u"), (2, "l")]
    )
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    ids = iter(range(10**6))

    def one(n: int, learner_lora: bool, user_lora: bool) -> dict:
        if n:
            params = SamplingParams(n=n, temperature=1.0, max_tokens=400, ignore_eos=True)
            engine.add_request(f"l{next(ids)}", render(LEARNER), params,
                               lora_request=learner_adapter if learner_lora else None)  # fmt: skip
            for _ in range(3):  # its prefill, then decoding
                engine.step()
        user = f"u{next(ids)}"
        started, steps = time.perf_counter(), []
        engine.add_request(user, render(USER), SamplingParams(temperature=0.0, max_tokens=32),
                           lora_request=user_adapter if user_lora else None)  # fmt: skip
        while True:
            t = time.perf_counter()
            outputs = engine.step()
            steps.append(time.perf_counter() - t)
            if any(o.finished and o.request_id == user for o in outputs):
                break
        latency = time.perf_counter() - started
        engine.abort_request(list(engine.output_processor.request_states))
        while engine.has_unfinished_requests():
            engine.step()
        return {"user_s": latency, "step_ms_median": 1000 * statistics.median(steps[1:])}

    rows = []
    for round_ in range(ROUNDS):
        for case, n, learner_lora, user_lora in CASES:
            rows.append({"round": round_, "case": case, **one(n, learner_lora, user_lora)})
    return rows


def run_arm(arm: str, adapter_dir: str) -> list[dict]:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if ARMS[arm] is not None:
        env["VLLM_PLUGINS"] = ARMS[arm]
    out = subprocess.run(
        [sys.executable, __file__, "--measure", adapter_dir], env=env, cwd=REPO,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from shared.assets import smollm2_dir
    from tests.synthetic import random_lora

    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_lora(smollm2_dir(), Path(tmp) / "adapter", rank=16)
        arms = {arm: run_arm(arm, str(adapter)) for arm in ARMS}
    summary = {
        arm: {
            case: {
                "user_s": [round(r["user_s"], 2) for r in rows if r["case"] == case],
                "step_ms": [round(r["step_ms_median"], 1) for r in rows if r["case"] == case],
            }
            for case, *_ in CASES
        }
        for arm, rows in arms.items()
    }
    result = {
        "benchmark": "cpu_lora_steps",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rounds": ROUNDS,
        "arms": summary,
    }
    out = REPO / "bench" / "results" / "cpu_lora_steps.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
    else:
        main()
