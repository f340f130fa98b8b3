"""CPU placement for the two vLLM engines of `dynalign up` (the server's and the learner's
rollout engine): tokens/s of each, alone and running at once. Writes JSON.

    python bench/cpu_placement.py              # SmolLM2-135M-Instruct, float32 (the CPU default)

Placements: dynalign's (the model in the engine-core process, a thread per core with a short
OpenMP spin: shared/engine.use_learner_threads), and vLLM's default (a worker process per
engine; its `auto` binding gives each engine the cores of one NUMA node minus one it reserves,
on a 2-core machine core 0 for both; or every core for each). Each engine runs in its own
process, loads, warms up, and waits; all engines of a scenario then generate the same batch
(32 sequences x 128 tokens, EOS ignored) at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARK = "PLACEMENT "  # prefix of the worker's protocol lines on stdout
DYNALIGN: dict[str, str] = {}  # what use_learner_threads and engine_kwargs set
WORKER_AUTO = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
WORKER_ALL_CORES = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
}
SCENARIOS = {  # name: the environment of each engine (server first)
    "alone, in-process": [DYNALIGN],
    "alone, worker process, auto": [WORKER_AUTO],
    "both, in-process": [DYNALIGN, DYNALIGN],
    "both, in-process, libgomp's default spin": [{"GOMP_SPINCOUNT": "300000"}] * 2,
    "both, worker processes, auto": [WORKER_AUTO, WORKER_AUTO],
    "both, worker processes, every core each": [WORKER_ALL_CORES, WORKER_ALL_CORES],
}


def worker(sequences: int, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    from shared.config import ModelConfig
    from shared.engine import engine_kwargs

    llm = LLM(**engine_kwargs(ModelConfig()))
    prompts = [f"Write a short story about city number {i}." for i in range(sequences)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=0)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    print(MARK + "ready", flush=True)
    sys.stdin.readline()  # go
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(MARK + json.dumps({"tokens": tokens, "seconds": seconds}), flush=True)
    llm.llm_engine.engine_core.shutdown()  # vLLM's LLM has no shutdown; its core would linger


def _protocol_line(process: subprocess.Popen) -> str:
    for line in process.stdout:
        if line.startswith(MARK):
            return line[len(MARK) :].strip()
    raise RuntimeError(f"engine worker exited with {process.wait()}")


def run_scenario(environments: list[dict], sequences: int, max_tokens: int) -> list[dict]:
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                f"--sequences={sequences}",
                f"--max-tokens={max_tokens}",
            ],
            env={
                **os.environ,
                **environment,
                "VLLM_LOGGING_STREAM": "ext://sys.stderr",
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,  # its engine-core process joins the group we end below
        )  # fmt: skip
        for environment in environments
    ]
    try:
        for process in workers:
            assert _protocol_line(process) == "ready"
        for process in workers:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(_protocol_line(process)) for process in workers]
    finally:
        for process in workers:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return [
        {
            "engine": ("server", "learner")[i],
            "environment": environment,
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            **r,
        }
        for i, (environment, r) in enumerate(zip(environments, results, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_placement.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.sequences, args.max_tokens)
    from shared.engine import use_learner_threads

    use_learner_threads()  # every engine's, as the learner's; a scenario overrides

    scenarios = {}
    for name, environments in SCENARIOS.items():
        scenarios[name] = run_scenario(environments, args.sequences, args.max_tokens)
        print(name, [e["tokens_per_s"] for e in scenarios[name]], flush=True)
    result = {
        "benchmark": "cpu_placement",
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "sequences": args.sequences,
        "max_tokens": args.max_tokens,
        "scenarios": scenarios,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
