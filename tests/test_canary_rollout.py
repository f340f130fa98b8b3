"""Canary rollout end to end: two server replicas on one registry and broker, scripted openai
users whose thumbs depend on the version that answered, and the learner's signal job deciding by
the canary rule. A better canary is promoted, a worse one rolled back, each user stays on one
version on both replicas, and the decisions are in the audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import openai
import pytest

from learner.signals import SignalJob
from shared.config import DynalignConfig, KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics
from shared.lifecycle import Lifecycle
from shared.registry import Registry
from tests.conftest import API_KEY, start_server
from tests.synthetic import publish_random
from tests.test_observability import wait_for

pytestmark = pytest.mark.slow

USERS = 80
RULE_ENV = {  # a rule sized for a test: decisions after 20 ratings per arm
    "DYNALIGN_GATE__CANARY_MIN_RATINGS": "20",
    "DYNALIGN_GATE__CANARY_MAX_RATINGS": "200",
    "DYNALIGN_GATE__CANARY_MARGIN": "0.1",
}


def thumbs(version: str, user: int, negative_every: dict[str, int]) -> str:
    """Deterministic users: every n-th user dislikes what version `version` answered."""
    return "down" if user % negative_every[version] == 0 else "up"


def canary_cli(store, bootstrap: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dynalign", "adapters", "canary", *args, "--json"],
        env={
            **os.environ,
            **RULE_ENV,
            "DYNALIGN_REGISTRY__STORE": str(store),
            "DYNALIGN_KAFKA__BOOTSTRAP": bootstrap,
        },
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_user(clients, canary: int, negative_every: dict[str, int], user: int) -> tuple[str, str]:
    """Two turns, one on each replica, and a rating of the first; the versions that answered."""
    versions = []
    for turn, client in enumerate(clients[user % 2 :] + clients[: user % 2]):
        raw = client.chat.completions.with_raw_response.create(
            model="dynalign",
            messages=[{"role": "user", "content": f"turn {turn} of user {user}"}],
            user=f"user-{canary}-{user}",
            temperature=0,
            max_tokens=4,
        )
        versions.append(raw.headers["x-dynalign-adapter-version"])
        if turn == 0:
            client.post(
                "/feedback",
                body={
                    "interaction_id": raw.headers["x-dynalign-interaction-id"],
                    "rating": thumbs(versions[0], user, negative_every),
                },
                cast_to=object,
            )
    return versions[0], versions[1]


def following(replicas, canary: int) -> None:
    """Wait until every replica splits for `canary` (0: splits no more)."""
    wait_for(
        lambda: all(r.metric("dynalign_canary_adapter_version") == canary for r in replicas),
        60,
        f"every replica following canary {canary}",
    )


def test_a_better_canary_is_promoted_and_a_worse_one_rolled_back(tmp_path, tiny_model):
    registry = Registry(tmp_path / "adapters")
    for seed in (1, 2, 3):
        publish_random(registry, tiny_model, seed=seed, scale=0.05)
    lifecycle = Lifecycle(registry)
    lifecycle.promote(1, "setup")
    env = {"DYNALIGN_REGISTRY__STORE": str(registry.root)}
    with EmbeddedBroker() as broker:
        kafka = KafkaConfig(bootstrap=broker.bootstrap)
        ensure_topics(kafka)
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        replicas = [
            start_server(tmp_path / name, tiny_model, broker.bootstrap, env=env)
            for name in ("a", "b")
        ]
        clients = [
            openai.OpenAI(base_url=f"{r.base_url}/v1", api_key=API_KEY, max_retries=0)
            for r in replicas
        ]
        # The learner's job, announcing its decisions on the control topic as `dynalign learn`.
        cfg = DynalignConfig(
            registry={"store": registry.root}, kafka={"bootstrap": broker.bootstrap}
        )
        job = SignalJob(kafka, lifecycle=Lifecycle.from_config(cfg))
        try:
            decisions = {}
            for canary, negative_every, expected in (
                (2, {"1": 2, "2": 10}, "live"),  # users like v2 better than v1
                (3, {"2": 10, "3": 1}, "rejected"),  # ... and dislike every v3 answer
            ):
                state = canary_cli(registry.root, broker.bootstrap, str(canary), "--share", "0.5")
                assert state["canary"]["version"] == canary
                live_before = str(state["live"])
                following(replicas, canary)
                started = time.monotonic()

                with ThreadPoolExecutor(4) as pool:
                    served = list(
                        pool.map(partial(one_user, clients, canary, negative_every), range(USERS))
                    )
                # sticky and agreed: each user got one version from both replicas
                assert all(first == second for first, second in served)
                shares = {
                    v: sum(first == v for first, _ in served) for v in (live_before, str(canary))
                }
                assert sum(shares.values()) == USERS and min(shares.values()) >= 20, shares
                wait_for(
                    lambda: (job.poll(timeout_ms=200), lifecycle.state().canary is None)[1],
                    60,
                    "the canary rule's decision",
                )
                decisions[canary] = time.monotonic() - started
                state = lifecycle.state()
                assert state.states[canary] == expected
                decided = registry.audit_log()[-1]
                assert decided.actor == "canary-rule" and decided.to_version == canary
                assert decided.canary["canary"]["ratings"] >= 20
                following(replicas, 0)
            assert lifecycle.state().live == 2
            print(f"canary decision seconds (users' traffic + rule): {decisions}")
        finally:
            job.close()
            for replica in replicas:
                replica.stop()
