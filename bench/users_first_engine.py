"""What the learner's requests on the serving engine cost a user, per way of sharing it, on
`up`'s layout: one `dynalign serve` on SmolLM2 (0.5 GiB of KV cache, as `up` sets it), one client
chatting back to back (32 tokens, not logged), and the learner's own requests through
learner/served.py with its CPU-sized settings: the rollout phase (2 prompts x G=8, <= 128
tokens, the CA system prompt) and the reward phase (16 self-scores of the paper's reward prompt:
prefill and one token each). Arms, each on a fresh server, in one run:
  priority          vLLM's priority scheduling alone (main before UsersFirst)
  prefill-2048      serving/rollout.py's turns: the learner's prompt tokens in flight <= 2048
  users-first       and each request started only once no user's request is in flight (or
                    after 30 s): `up`'s and `serve`'s defaults until 512 was measured
  users-first-512   the same with the learner's prompt tokens in flight <= 512: one rollout
                    group or one self-score at a time
  users-first-512-kv384  and 384 MiB of KV cache instead of 512 (8192 tokens, SmolLM2's
                    context, need 360 MiB)
Earlier runs: bench/results/users_first_engine-budget.json (a step budget,
max_num_batched_tokens, of 1024 instead of vLLM's CPU default 4096 left the user held 13-16 s in
the reward phase, as at 4096) and users_first_engine-slots.json (2 or 4 learner requests at
once, without the hold: the same 12-14 s, and the gate's answers took 37-43 s or 20-23 s
against 8 s): what holds the user is a learner prefill in every step, whatever its size.
Per arm, ROUNDS rounds: users' p50 in each phase against idle, each phase's seconds, and the
learner's phases with no user (rollout, reward, a gate's 24 greedy answers).

    python bench/users_first_engine.py [ARM ...] [--out NAME]
                                # writes bench/results/NAME.json (users_first_engine)
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
from pathlib import Path

import psutil
from pydantic import SecretStr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import users_first  # noqa: E402
from bench.users_first import TOKEN, user_latencies  # noqa: E402

# name -> (max_num_batched_tokens, rollout_prefill_tokens, rollout_max_hold_s, KV cache bytes)
ARMS = {
    "priority": (4096, 0, 0.0, 2**29),  # 4096: vLLM's CPU default
    "prefill-2048": (4096, 2048, 0.0, 2**29),
    "users-first": (4096, 2048, 30.0, 2**29),
    "users-first-512": (4096, 512, 30.0, 2**29),
    "users-first-512-kv384": (4096, 512, 30.0, 384 * 2**20),
}
ROUNDS = 2
IDLE_S = 30.0
CONVERSATIONS = [
    [{"role": "user", "content": "How can neighbours share tools without losing them?"}],
    [{"role": "user", "content": "What should a small town do about a closing library?"}],
]


def start_server(work: Path, arm: str) -> tuple[subprocess.Popen, str]:
    budget, prefill_tokens, hold_s, kv_bytes = ARMS[arm]
    return users_first.start_server(
        work,
        {
            "DYNALIGN_SERVING__ROLLOUT_PREFILL_TOKENS": str(prefill_tokens),
            "DYNALIGN_SERVING__ROLLOUT_MAX_HOLD_S": str(hold_s),
            "DYNALIGN_MODEL__ENGINE_ARGS": json.dumps(
                {"kv_cache_memory_bytes": kv_bytes, "max_num_batched_tokens": budget}
            ),
        },
    )


def engine(work: Path, base: str):
    from learner.served import ServedEngine
    from shared.config import DynalignConfig

    cfg = DynalignConfig(data_dir=work / "data")
    cfg.learner = cfg.learner.cpu_sized().model_copy(
        update={"rollout_endpoints": [base], "rollout_token": SecretStr(TOKEN)}
    )
    return ServedEngine(cfg, work / "learner")


def during(base: str, work) -> tuple[object, float, list[float]]:
    stop, rows = threading.Event(), []
    user = threading.Thread(target=user_latencies, args=(base, stop, rows))
    user.start()
    started = time.perf_counter()
    try:
        return work(), time.perf_counter() - started, rows
    finally:
        stop.set()
        user.join()


def quiet_step(served) -> dict[str, float]:
    """The learner's phases with no user: rollout, reward, and a gate's answers (its CPU-sized
    probes, greedy, 48 tokens): what the turns cost the learner when users leave it room."""
    from learner.gate import probe_prompts
    from learner.rollout import Sampling
    from shared.config import GateConfig

    gate = GateConfig().cpu_sized()
    probes = probe_prompts(gate)[: gate.probe_limit]
    started = time.perf_counter()
    candidates = served.sample(CONVERSATIONS)
    sampled = time.perf_counter()
    served.self_scores(CONVERSATIONS, candidates)
    scored = time.perf_counter()
    served.generate(probes, Sampling(max_tokens=gate.max_new_tokens), None)
    return {
        "quiet_rollout_s": sampled - started,
        "quiet_reward_s": scored - sampled,
        "quiet_gate_answers_s": time.perf_counter() - scored,
    }


def p50(rows: list[float]) -> float | None:
    return statistics.median(rows) if rows else None


def engine_core_rss_gib(server: subprocess.Popen) -> float:
    children = psutil.Process(server.pid).children(recursive=True)
    return sum(c.memory_info().rss for c in children) / 2**30


def measure(arm: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"users-first-engine-{arm}-"))
    server, base = start_server(work, arm)
    try:
        served = engine(work, base)
        idle: list[float] = []
        stop = threading.Event()
        threading.Timer(IDLE_S, stop.set).start()
        user_latencies(base, stop, idle)
        rounds = []
        for _ in range(ROUNDS):
            quiet = quiet_step(served)
            candidates, rollout_s, rollout_users = during(
                base, lambda: served.sample(CONVERSATIONS)
            )
            scores, reward_s, reward_users = during(
                base, lambda c=candidates: served.self_scores(CONVERSATIONS, c)
            )
            rounds.append(
                {
                    "rollout_s": rollout_s,
                    "rollout_users_p50_s": p50(rollout_users),
                    "rollout_users": len(rollout_users),
                    "reward_s": reward_s,
                    "reward_users_p50_s": p50(reward_users),
                    "reward_users": len(reward_users),
                    "scored": sum(s is not None for row in scores for s in row),
                    **quiet,
                }
            )
            print(arm, rounds[-1], flush=True)
        idle_p50 = p50(idle)
        return {
            "arm": arm,
            "max_num_batched_tokens": ARMS[arm][0],
            "rollout_prefill_tokens": ARMS[arm][1],
            "rollout_max_hold_s": ARMS[arm][2],
            "kv_cache_bytes": ARMS[arm][3],
            "idle_users_p50_s": idle_p50,
            "idle_users": len(idle),
            "rounds": rounds,
            "rollout_users_over_idle": [r["rollout_users_p50_s"] / idle_p50 for r in rounds],
            "reward_users_over_idle": [r["reward_users_p50_s"] / idle_p50 for r in rounds],
            "engine_core_rss_gib": engine_core_rss_gib(server),
        }
    finally:
        server.send_signal(2)
        server.wait(timeout=60)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("arms", nargs="*", default=list(ARMS), help=", ".join(ARMS))
    parser.add_argument("--out", default="users_first_engine")
    args = parser.parse_args()
    if unknown := set(args.arms) - set(ARMS):
        parser.error(f"no arm {', '.join(sorted(unknown))}")
    results = {
        "benchmark": "users_first_engine",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "arms": [measure(arm) for arm in args.arms],
    }
    out = REPO / "bench" / "results" / f"{args.out}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
