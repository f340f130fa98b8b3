"""Stopping dynalign ends every process it started: `dynalign learn` on SIGTERM (how Kubernetes and
compose stop a container) and `dynalign up` on Ctrl-C leave no vLLM engine core, learner or broker
running (each orphaned engine core held ~700 MB and a CPU core); `up` started again on the same
data directory has its whole interaction log back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from shared.kafka import free_port
from tests.conftest import API_KEY

pytestmark = pytest.mark.slow


def wait_until(condition, what: str, process: subprocess.Popen, log: Path, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"exited waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)  # polling the process table or an HTTP endpoint: nothing to wait on


def engine_cores(pid: int) -> int:
    count = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            count += "EngineCore" in " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            pass
    return count


def answers(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None  # still starting
    return response.text if response.status_code == 200 else None


def stop_and_check(process: subprocess.Popen, sig: int, log: Path, timeout_s: float) -> None:
    """Send `sig`; the process must exit within `timeout_s` and take all its descendants along."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    names = {p.pid: " ".join(p.cmdline())[:80] for p in descendants}
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"still running {timeout_s}s after {signal.Signals(sig).name}:\n"
            + log.read_text()[-4000:]
        )
    finally:
        _, alive = psutil.wait_procs(descendants, timeout=5)
        for leftover in alive:  # keep the machine clean whatever the verdict
            leftover.kill()
    assert not alive, (
        f"left running after {signal.Signals(sig).name}: "
        + "; ".join(f"{p.pid} {names[p.pid]}" for p in alive)
        + "\n"
        + log.read_text()[-3000:]
    )


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        # Its own process group, only so that a failing test can still clean up after it.
        return subprocess.Popen(
            [sys.executable, "-m", "dynalign", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # all gone, as it should be
        pass
    process.wait()


def base_env(tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DYNALIGN_MODEL__PATH": str(tiny_model),
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_LEARNER__METRICS_PORT": str(free_port()),
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
        "DYNALIGN_REGISTRY__STORE": str(tmp_path / "adapters"),
        "DYNALIGN_GATE__ENABLED": "false",
    }


def test_sigterm_ends_learn_and_its_engine(tmp_path, tiny_model):
    """The signal comes while the engine starts, the hardest moment: vLLM's start-up swallows
    or delays what a signal handler raises (on a GPU it waits in pyzmq's poll for its engine
    core; on a CPU the engine runs in the learner's process)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Plan day {i}"}) + "\n" for i in range(4)))
    log = tmp_path / "learn.log"
    process = start(
        ["learn", "--prompts", str(prompts), "--workdir", str(tmp_path / "learner")],
        tmp_path,
        base_env(tmp_path, tiny_model),
        log,
    )
    try:
        wait_until(
            lambda: "rollout engine starting" in log.read_text(errors="replace"),
            "the engine starting",
            process,
            log,
            180,
        )
        stop_and_check(process, signal.SIGTERM, log, timeout_s=60)
    finally:
        kill_group(process)


def test_up_learns_ends_on_ctrl_c_and_restarts_with_its_whole_log(tmp_path, tiny_model):
    """`dynalign up` is the single-user demo: one API key chats, and its learner (share cap off)
    steps on those chats. Ctrl-C ends the server, the learner, both engines and the broker.
    The broker keeps nothing itself; started again on the same data directory, `up` has every
    earlier interaction back in the topic at its offset, and its learner, resuming from its
    checkpoint, trains on each record exactly once."""
    from openai import OpenAI

    from shared.kafka import range_offsets, read_range
    from shared.registry import Registry

    data = tmp_path / "data"
    port, learner_port = free_port(), free_port()
    env = {
        **base_env(tmp_path, tiny_model),
        "DYNALIGN_LEARNER__METRICS_PORT": str(learner_port),
        "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "1",
        "DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY]),
    }
    del env["DYNALIGN_REGISTRY__STORE"]  # the data directory holds all of it
    args = ["up", "--model", str(tiny_model), "--port", str(port), "--data-dir", str(data)]
    registry = Registry(data / "adapters")
    asked: list[str] = []

    def run(prompts: list[str], versions: int, log: Path) -> list:
        """Start, chat, wait for the learner's candidate, Ctrl-C; the broker's address."""
        process = start(args, tmp_path, env, log)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(f"{base}/health") is not None, "server", process, log, 240)
            client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
            for text in prompts:  # one step's two prompts
                response = client.chat.completions.with_raw_response.create(
                    model="dynalign", max_tokens=4, messages=[{"role": "user", "content": text}]
                )
                asked.append(response.headers["x-dynalign-interaction-id"])
            wait_until(
                lambda: len(registry.versions()) >= versions, "a candidate", process, log, 240
            )
            # The server's engine core; the learner's engine runs in the learner's process.
            assert engine_cores(process.pid) == 1
            bootstrap = re.search(r"kafka\s+(127\.0\.0\.1:\d+)", log.read_text()).group(1)
            name = "dynalign.interactions"
            topic = list(read_range(bootstrap, name, *range_offsets(bootstrap, name, None, None)))
            stop_and_check(process, signal.SIGINT, log, timeout_s=90)
            return topic
        finally:
            kill_group(process)

    run(["Plan a picnic", "Name a park"], 1, tmp_path / "up-1.log")
    second_log = tmp_path / "up-2.log"
    topic = run(["Plan a hike", "Name a river"], 2, second_log)
    printed = " ".join(second_log.read_text().split())  # the terminal may wrap a line
    assert "its log kept by the outbox: 2 records back" in printed  # before the learner started

    # Every interaction in the log once; each version trained on offsets no other one did.
    offsets = {(m.partition, m.offset): json.loads(m.value)["id"] for m in topic}
    assert sorted(offsets.values()) == sorted(asked) and len(asked) == 4
    trained = [
        (int(key.rsplit(":", 1)[1]), offset)
        for version in registry.versions()
        for key, (first, last) in registry.manifest(version).trained_offsets.items()
        for offset in range(first, last + 1)
    ]
    assert sorted(trained) == sorted(offsets)


def test_up_restarts_a_killed_learner_and_a_sigkilled_up_leaves_no_learner_or_broker(
    tmp_path, tiny_model
):
    """The learner killed (-9, as the OOM killer does) is started again: the server's /health
    names it with its restart and exit code, dynalign_up_restarts_total counts it. `up` itself
    SIGKILLed runs none of its cleanup; its learner and broker end anyway."""
    port = free_port()
    env = {**base_env(tmp_path, tiny_model), "DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY])}
    args = ["up", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    log = tmp_path / "up.log"
    process = start(args, tmp_path, env, log)
    base = f"http://127.0.0.1:{port}"

    def learner() -> dict | None:
        body = answers(f"{base}/health")
        state = json.loads(body)["processes"]["learner"] if body else None
        return state if state and state["state"] == "running" else None

    try:
        wait_until(learner, "the learner running", process, log, 240)
        first = learner()
        assert first["restarts"] == 0 and first["last_exit_code"] is None
        os.kill(first["pid"], signal.SIGKILL)
        wait_until(lambda: (s := learner()) and s["restarts"] == 1, "a restart", process, log, 60)
        again = learner()
        assert again["last_exit_code"] == -signal.SIGKILL and again["pid"] != first["pid"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'dynalign_up_restarts_total{process="learner"} 1.0' in metrics

        survivors = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "learn" in p.cmdline() or "tansu" in " ".join(p.cmdline())
        ]
        assert len(survivors) == 2  # the learner and the broker
        process.send_signal(signal.SIGKILL)
        process.wait()
        _, alive = psutil.wait_procs(survivors, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    finally:
        kill_group(process)
