"""The learner on real components: vLLM rollouts, PEFT training, a real Kafka-protocol broker
fed by a real server, checkpoints and offsets across SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from learner import checkpoint
from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics, free_port
from shared.registry import AdapterStore
from tests.conftest import API_KEY, REPO, json_result, rollout_env, start_server

pytestmark = pytest.mark.slow


def test_known_reward_is_learned(tmp_path, tiny_model):
    """With a reward we control, a bounded run must raise it well above where it started."""
    out = tmp_path / "steps.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "known_reward_run.py"),
            str(tiny_model),
            str(tmp_path / "work"),
            "40",
            str(out),
        ],
        check=True,
        timeout=900,
    )
    rewards = [json.loads(line)["reward_mean"] for line in out.read_text().splitlines()]
    assert len(rewards) == 40
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.15, rewards


# -- end to end through Kafka ---------------------------------------------------------------------
@pytest.fixture
def loop(tmp_path_factory, tiny_model):
    """Its own broker and server, so the topic holds exactly what these tests chat."""
    work = tmp_path_factory.mktemp("loop")
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        # The learner rolls out here: room for the judge's prompt (~700 tokens) around an answer.
        server = start_server(
            work, tiny_model, broker.bootstrap, env={"DYNALIGN_MODEL__MAX_MODEL_LEN": "1024"}
        )
        try:
            yield work, broker, server
        finally:
            server.stop()


def chat(server, texts: list[str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    for i, text in enumerate(texts):
        client.chat.completions.create(
            model="dynalign",
            user=f"user-{i}",
            max_tokens=4,
            messages=[{"role": "user", "content": text}],
        )


def learn(work: Path, broker, server, tiny_model, max_steps: int, crash_at: str | None = None):
    """`dynalign learn` rolling out on `server`, as under `dynalign up`."""
    env = {
        **os.environ,
        "DYNALIGN_MODEL__PATH": str(tiny_model),
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_KAFKA__BOOTSTRAP": broker.bootstrap,
        # 2 prompts x 8 candidates per step, a checkpoint every 2 steps.
        "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "16",
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "16",
        "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "2",
        "DYNALIGN_LEARNER__LR": "1e-3",  # large enough to change greedy text in two steps
        # Every chat comes with one API key, one principal: the share cap off, as in
        # `dynalign up`'s single-user mode (a cap would defer every second prompt).
        "DYNALIGN_LEARNER__MAX_USER_SHARE": "1.0",
        "DYNALIGN_LEARNER__METRICS_PORT": str(free_port()),
        "DYNALIGN_LEARNER__CONSUMER_GROUP": "test-learner",
        "DYNALIGN_REGISTRY__STORE": str(work / "adapters"),
        **rollout_env(server),
    }
    if crash_at:
        env["DYNALIGN_LEARNER_CRASH_AT"] = crash_at
    log = work / f"learn-{uuid.uuid4().hex[:6]}.log"
    with log.open("w") as out:
        # Its own process group: a SIGKILL takes down the whole learner, engine processes
        # included, as when a container dies; we reap the orphans the same way.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynalign",
                "learn",
                "--max-steps",
                str(max_steps),
                "--workdir",
                str(work / "learner"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        returncode = process.wait(timeout=900)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return subprocess.CompletedProcess(process.args, returncode, log.read_text(), "")


def committed(broker) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        offsets = admin.list_group_offsets("test-learner")["test-learner"]
    finally:
        admin.close()
    return {
        f"{tp.topic}:{tp.partition}": meta.offset
        for tp, meta in offsets.items()
        if meta.offset >= 0
    }


def newest_checkpoint(work: Path):
    return checkpoint.latest(work / "learner")[1]


@pytest.mark.timeout(1800)
def test_chats_become_candidates_and_sigkills_lose_or_repeat_nothing(loop, tiny_model):
    """One learner's life on one topic, so its phases run in this order: chats become a
    candidate that changes outputs; a SIGKILL between checkpoint and commit repeats nothing;
    a SIGKILL mid-step skips nothing."""
    work, broker, server = loop
    store = AdapterStore(work / "adapters")

    # Chats become a candidate adapter that changes vLLM's outputs.
    chat(server, [f"Plan a trip to city {i} {uuid.uuid4().hex[:6]}" for i in range(4)])
    result = learn(work, broker, server, tiny_model, max_steps=2)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "step     2" in result.stdout and "candidate v1" in result.stdout
    assert store.versions() == [1]
    manifest = store.manifest(1)
    run_id = (work / "learner" / "run_id").read_text()
    assert manifest.steps == 2 and manifest.lineage == f"{run_id}/step-00000002"
    used = sum(last - first + 1 for first, last in manifest.trained_offsets.values())
    assert used == 4  # 2 steps x 2 prompts: every chatted record, nothing else
    assert committed(broker) == newest_checkpoint(work).next_offsets
    compare = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "compare_adapter.py"),
            str(tiny_model),
            str(store.path(1)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    # vLLM serves the candidate and it moves the base model's own answers.
    assert json_result(compare.stdout)["max_logprob_change"] > 0.01

    # SIGKILL after the checkpoint and version, before the offsets commit.
    before = committed(broker)
    chat(server, [f"Organise a move {i} {uuid.uuid4().hex[:6]}" for i in range(4)])
    crashed = learn(work, broker, server, tiny_model, max_steps=4, crash_at="before-commit")
    assert crashed.returncode == -signal.SIGKILL
    assert store.versions() == [1, 2]  # checkpoint and version written ...
    assert committed(broker) == before  # ... offsets not yet committed
    resumed = learn(work, broker, server, tiny_model, max_steps=4)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert store.versions() == [1, 2]  # the same checkpoint is not published twice
    state = newest_checkpoint(work)
    assert state.step == 4 and committed(broker) == state.next_offsets
    assert sum(state.next_offsets.values()) == 8

    # SIGKILL in the middle of a step: the step's records are read again, not skipped.
    chat(server, [f"Choose a school {i} {uuid.uuid4().hex[:6]}" for i in range(4)])
    crashed = learn(work, broker, server, tiny_model, max_steps=6, crash_at="mid-step")
    assert crashed.returncode == -signal.SIGKILL
    assert newest_checkpoint(work).step == 4  # step 5 was lost with the process
    resumed = learn(work, broker, server, tiny_model, max_steps=6)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert store.versions() == [1, 2, 3]
    trained = store.manifest(3).trained_offsets
    assert sum(last - first + 1 for first, last in trained.values()) == 4  # re-read, not skipped
    assert committed(broker) == newest_checkpoint(work).next_offsets
    assert sum(committed(broker).values()) == 12
