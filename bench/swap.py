"""Hot-swap benchmark: time from an operator's promote/rollback command to the first response
served by the new version, while clients keep the server busy. Writes JSON.

    python bench/swap.py                  # SmolLM2-135M-Instruct (the embedded default)
    python bench/swap.py --model PATH --swaps 20 --clients 4

Two synthetic adapter versions (real PEFT LoRA files, rank 16 on every linear layer) are
published, then promoted alternately. Each swap reports: the admin call's own latency (the
alias has moved when it returns; the first use of a version also loads it into the engine) and
command -> first new-version response, which includes one whole request under this load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import KafkaConfig, ModelConfig  # noqa: E402
from shared.kafka import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from shared.registry import Registry  # noqa: E402
from tests.synthetic import publish_random  # noqa: E402

TOKEN = "bench-operator"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "swap.json"))
    args = parser.parse_args()

    import subprocess

    from shared.models import resolve_model_path

    model_dir = Path(resolve_model_path(ModelConfig(path=args.model)))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        registry = Registry(Path(tmp) / "adapters")
        for seed in (1, 2):
            publish_random(registry, model_dir, rank=16, seed=seed, scale=0.05)
        port = free_port()
        env = {
            **os.environ,
            "DYNALIGN_REGISTRY__STORE": str(registry.root),
            "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({"bench": TOKEN}),
            "DYNALIGN_SERVING__OUTBOX_DIR": str(Path(tmp) / "outbox"),
            "DYNALIGN_SERVING__USER_HASH_SALT": "bench",
        }
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynalign",
                "serve",
                "--port",
                str(port),
                "--kafka",
                broker.bootstrap,
                "--model",
                str(model_dir),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.5)
            result = run(url, args)
        finally:
            server.send_signal(2)
            server.wait(timeout=60)
    result.update(model=str(model_dir), settings=vars(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "swaps"}, indent=2))


def run(url: str, args: argparse.Namespace) -> dict:
    body = {
        "model": "dynalign",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Plan my week"}],
    }
    seen: list[tuple[float, str]] = []  # (end time, version)
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                start = time.monotonic()
                r = http.post(f"{url}/v1/chat/completions", json=body)
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append((time.monotonic(), r.headers["x-dynalign-adapter-version"]))
                    latencies.append(time.monotonic() - start)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    swaps = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for i in range(args.swaps):
            target = 1 + i % 2
            start = time.monotonic()
            r = httpx.post(
                f"{url}/admin/adapters/{target}/promote", headers=auth, json={}, timeout=120
            )
            command_s = time.monotonic() - start
            r.raise_for_status()
            while not any(t >= start and v == str(target) for t, v in seen):
                time.sleep(0.005)  # polling the clients' results for the measurement
            first = min(t for t, v in seen if t >= start and v == str(target))
            swaps.append({"to": target, "command_s": command_s, "first_response_s": first - start})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    firsts = [s["first_response_s"] for s in swaps]
    commands = [s["command_s"] for s in swaps]
    return {
        "benchmark": "swap",
        "requests": len(seen),
        "failed_requests": len(failures),
        "command_s": {"p50": statistics.median(commands), "max": max(commands)},
        "first_response_s": {"p50": statistics.median(firsts), "max": max(firsts)},
        # A first response needs one whole request after the switch: compare with this.
        "request_latency_s": {"p50": statistics.median(latencies), "max": max(latencies)},
        "swaps": swaps,
    }


if __name__ == "__main__":
    main()
