"""What the learner's work costs a user of the engine it shares, phase by phase, on `up`'s
layout (one `dynalign serve` on SmolLM2, the learner's update in a process beside it, one
machine): one client's chat latency (32 tokens, not logged) idle; while a step's 16 rollouts
(<= 128 tokens, the CA system prompt) run on the server's rollout route at a given
concurrency; and while the CPU-sized update runs beside it at a given niceness and thread
count, for WINDOW_S, with the update's pace there against its pace alone: what users' priority
costs the learner. `up`'s settings for its learner are chosen from this.

    python bench/users_first.py            # writes bench/results/users_first.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.kafka import free_port  # noqa: E402

TOKEN = "bench-learner"
USER = [{"role": "user", "content": "Give me one tip for sleeping better."}]
PROMPTS = [
    "How can neighbours share tools without losing them?",
    "What should a small town do about a closing library?",
]
ROLLOUT_CONCURRENCY = [16, 8, 4]
UPDATES = [  # (niceness, torch threads)
    (0, 2),
    (0, 1),
    (10, 2),
    (19, 2),
    (19, 1),
]
WINDOW_S = 75.0  # each update setting's window: several micro-batches even at a low share


def user_latencies(base: str, stop: threading.Event, rows: list[float]) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer bench"}, timeout=300) as c:
        while not stop.is_set():
            started = time.perf_counter()
            c.post(
                "/v1/chat/completions",
                json={
                    "model": "dynalign",
                    "messages": USER,
                    "max_tokens": 32,
                    "temperature": 0.7,
                    "metadata": {"train": "false"},
                },
            ).raise_for_status()
            rows.append(time.perf_counter() - started)


def rollouts(base: str, concurrency: int) -> float:
    from shared.prompts import OUTPUT_SYSTEM_PROMPT

    def one(prompt: str) -> None:
        httpx.post(
            f"{base}/admin/rollout/v1/chat/completions",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={
                "model": "dynalign",
                "messages": [
                    {"role": "system", "content": OUTPUT_SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                ],
                "max_tokens": 128,
                "temperature": 1.0,
            },
            timeout=600,
        ).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, [p for p in PROMPTS for _ in range(8)]))
    return time.perf_counter() - started


def update_worker(threads: int) -> None:
    """The CPU-sized update as the learner runs it (bench/learner_memory.py's batch), one
    micro-batch per optimiser call so that the parent can count progress: a line each."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from shared.engine import use_learner_threads

    use_learner_threads()
    import torch
    from transformers import AutoModelForCausalLM

    from learner.grpo import micro_batches
    from learner.policy import apply_lora, grpo_step, lora_layers, make_optimizer
    from shared.assets import smollm2_dir
    from shared.config import LearnerConfig

    lc = LearnerConfig().cpu_sized()
    model = apply_lora(AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32), lc)
    layers, optimizer = lora_layers(model), make_optimizer(model, lc)
    batch = {
        "input_ids": torch.randint(0, 49000, (16, 248)),
        "attention_mask": torch.ones(16, 248, dtype=torch.long),
        "completion_mask": torch.ones(16, 128, dtype=torch.long),
        "advantages": torch.randn(16),
    }
    model.train()
    print("ready", flush=True)
    sys.stdin.readline()
    while True:
        for micro_batch in micro_batches(batch, lc.micro_batch_completions):
            grpo_step(model, layers, optimizer, [micro_batch], lc)
            print(time.monotonic(), flush=True)


def update(niceness: int, threads: int, base: str | None) -> tuple[float | None, list[float]]:
    """Seconds a whole update (16 completions) takes at this pace, and users' latencies
    (none when `base` is None: the update alone) over WINDOW_S."""
    worker = subprocess.Popen(
        [sys.executable, __file__, "update", str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.nice(niceness),
    )
    assert worker.stdout.readline().strip() == "ready"
    stop, rows = threading.Event(), []
    user = threading.Thread(target=user_latencies, args=(base, stop, rows)) if base else None
    ticks: list[float] = []
    reader = threading.Thread(
        target=lambda: [ticks.append(float(line)) for line in worker.stdout], daemon=True
    )
    reader.start()
    if user:
        user.start()
    worker.stdin.write("go\n")
    worker.stdin.flush()
    started = time.monotonic()
    stop.wait(WINDOW_S)
    stop.set()
    if user:
        user.join()
    worker.kill()
    worker.wait()
    done = [t for t in ticks if t <= started + WINDOW_S]
    # None: not one micro-batch in the window (the update stood still).
    return (WINDOW_S / len(done) * 16 / 2 if done else None), rows


def with_user(base: str, work) -> tuple[object, list[float]]:
    stop, rows = threading.Event(), []
    user = threading.Thread(target=user_latencies, args=(base, stop, rows))
    user.start()
    try:
        return work(), rows
    finally:
        stop.set()
        user.join()


def summary(rows: list[float]) -> dict:
    return {"requests": len(rows), "p50_s": statistics.median(rows) if rows else None}


def start_server(work: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`dynalign serve` on SmolLM2 with no broker, an API key "bench" and the learner's
    operator token; returns it once /health answers."""
    port = free_port()
    env = {
        **os.environ,
        "DYNALIGN_DATA_DIR": str(work / "data"),
        "DYNALIGN_SERVING__OUTBOX_DIR": str(work / "outbox"),
        "DYNALIGN_SERVING__API_KEYS": json.dumps(["bench"]),
        "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({"learner": TOKEN}),
        "DYNALIGN_SERVING__USER_HASH_SALT": "bench-salt",
        **extra_env,
    }
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "dynalign", "serve", "--port", str(port), "--kafka", "127.0.0.1:1"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    while True:
        assert server.poll() is None, (work / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code in (200, 503):
                return server, base
        except httpx.HTTPError:
            time.sleep(1)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="users-first-"))
    server, base = start_server(work, {})
    try:
        idle: list[float] = []
        stop = threading.Event()
        threading.Timer(40, stop.set).start()
        user_latencies(base, stop, idle)
        results = {"idle": summary(idle), "rollouts": [], "updates": []}
        print(results["idle"], flush=True)
        for concurrency in ROLLOUT_CONCURRENCY:
            seconds, rows = with_user(base, lambda c=concurrency: rollouts(base, c))
            results["rollouts"].append(
                {"concurrency": concurrency, "rollout_s": seconds, "users": summary(rows)}
            )
            print(results["rollouts"][-1], flush=True)
        alone, _ = update(0, 2, None)
        results["update_alone_s"] = alone
        print("update alone", alone, flush=True)
        for niceness, threads in UPDATES:
            seconds, rows = update(niceness, threads, base)
            results["updates"].append(
                {
                    "niceness": niceness,
                    "threads": threads,
                    "update_s": seconds,
                    "users": summary(rows),
                }
            )
            print(results["updates"][-1], flush=True)
    finally:
        server.send_signal(2)
        server.wait(timeout=60)
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    out = REPO / "bench" / "results" / "users_first.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["update"]:
        update_worker(int(sys.argv[2]))
    else:
        main()
