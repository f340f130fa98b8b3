"""Shared fixtures: a real Kafka-protocol broker, the tiny model, and a real dynalign server
process (vLLM engine inside) reached over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kafka import TopicPartition

from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, consumer, ensure_topics, free_port

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
OTHER_KEY = "other-test-key"  # a second client of the same servers
LEARNER_TOKEN = "test-learner-token"  # the operator token learners roll out with


def pytest_configure(config):
    # Nothing the suite starts uses the per-user data directory, not even a process a
    # session-scoped fixture starts before any test's own directory (below) is set.
    os.environ["DYNALIGN_DATA_DIR"] = tempfile.mkdtemp(prefix="dynalign-tests-")


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Each test's own data directory (processes it starts inherit it): the default is per
    user (shared/config.py), not to be shared between tests or with whoever runs them."""
    path = tmp_path / "data"
    monkeypatch.setenv("DYNALIGN_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from shared.assets import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        ensure_topics(KafkaConfig(bootstrap=b.bootstrap))
        yield b


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    outbox_dir: Path
    data_dir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # Ctrl-C: the clean shutdown path
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metric_sum(self, name: str) -> float:
        """The sum of a metric over all its label sets (0 when it has none yet)."""
        text = httpx.get(f"{self.base_url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_server(
    workdir: Path,
    model: Path,
    bootstrap: str,
    *,
    verb: str = "serve",
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> ServerProcess:
    port = free_port()
    outbox = workdir / "outbox"
    data_dir = workdir / "data"
    log_path = workdir / "server.log"
    full_env = {
        **os.environ,
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "512",
        "DYNALIGN_DATA_DIR": str(data_dir),
        "DYNALIGN_SERVING__OUTBOX_DIR": str(outbox),
        "DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY, OTHER_KEY]),
        "DYNALIGN_SERVING__MAX_REQUEST_BYTES": str(256 * 1024),
        "DYNALIGN_SERVING__USER_HASH_SALT": "test-salt",
        "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({"learner": LEARNER_TOKEN}),
        **(env or {}),
    }
    args = [sys.executable, "-m", "dynalign", verb, "--port", str(port)]
    if str(model):
        args += ["--model", str(model)]
    if bootstrap:
        args += ["--kafka", bootstrap]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path, outbox, data_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"server not healthy:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def rollout_env(server: ServerProcess) -> dict[str, str]:
    """A learner's settings to roll out on `server` (as `dynalign up` sets its learner's)."""
    return {
        "DYNALIGN_LEARNER__ROLLOUT_ENDPOINTS": json.dumps([server.base_url]),
        "DYNALIGN_LEARNER__ROLLOUT_TOKEN": LEARNER_TOKEN,
        "DYNALIGN_REGISTRY__ROLLOUT_DIR": str(server.data_dir / "rollout-adapters"),
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model, broker):
    server = start_server(tmp_path_factory.mktemp("server"), tiny_model, broker.bootstrap)
    yield server
    server.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def read_records(
    bootstrap: str,
    topic: str,
    keep: Callable[[dict], bool],
    expected: int,
    timeout_s: float = 60,
    settle_s: float = 0.0,
) -> list[tuple[dict, dict]]:
    """Read the topic from the beginning until `expected` kept records are in (or time out);
    then keep reading for `settle_s` to catch extras. Returns (record, headers) pairs."""
    c = consumer(bootstrap, group_id=None)
    deadline = time.monotonic() + timeout_s
    try:
        while not (known := c.partitions_for_topic(topic)):  # a restarted broker starts empty
            assert time.monotonic() < deadline, f"topic {topic} never appeared"
            time.sleep(0.2)
        partitions = [TopicPartition(topic, p) for p in known]
        c.assign(partitions)
        c.seek_to_beginning(*partitions)
        found: list[tuple[dict, dict]] = []
        settle_until = None
        while time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=200).values():
                for message in batch:
                    record = json.loads(message.value)
                    if keep(record):
                        found.append((record, {k: v.decode() for k, v in message.headers}))
            if len(found) >= expected:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
        return found
    finally:
        c.close()


def json_result(stdout: str) -> dict:
    """The JSON line a helper script printed last (vLLM logs to stdout around it)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
