"""Scale-out rehearsal on one machine: the deployment's shape (many servers behind a load
balancer, one broker, one learner, one registry) under load while its parts are killed.
Writes JSON.

    python bench/scaleout.py                          # tiny model, 3 replicas
    python bench/scaleout.py --model PATH --clients 4

What runs: a Kafka-protocol broker (Tansu); `--replicas` `dynalign serve` processes, each with
its own outbox and all on one adapter registry; HAProxy (Debian's package) round-robin in front
of them with health checks on /health; one `dynalign learn`, which rolls out and self-scores on
the replicas (the killed one first: learner/served.py fails over); `--clients` threads of the
official openai client (3 retries) sending chats through HAProxy the whole time. Meanwhile, in
order: kill -9 the replica the learner rolls out on (engine and all) while a step is in flight,
and start it again; kill -9 the learner and start it again; promote a version through one
replica's admin API, then roll it back.

Measured: requests that failed for the client after its retries, attempts the client retried,
interactions lost (accepted requests whose record id is not in the topic once the outboxes
drain; duplicates are counted, consumers deduplicate by id), the time from the promote and the
rollback until every replica serves the new live version, and whether the restarted learner
built two versions from the same offsets, and the learner's failovers to another replica (the
killed one costs a retry, not a step).

Not rehearsed: killing the broker. Tansu here stores in memory or on S3, and the S3 servers the
package registries carry are not storage to run a broker on (moto 5.2 behind Tansu 0.6 reported
every partition's end as offset 1; see README "Interaction log"), so a killed broker would come
back empty. deploy/ runs Apache Kafka with 3 replicas for that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import KafkaConfig  # noqa: E402
from shared.kafka import (  # noqa: E402
    EmbeddedBroker,
    ensure_topics,
    free_port,
    range_offsets,
    read_range,
)
from shared.registry import Registry  # noqa: E402

API_KEY = "rehearsal-key"
VICTIM = 1  # the replica killed
THINK_S = 0.2  # each client's pause between requests: load that leaves a restart some CPU
OPERATOR = "rehearsal-operator"
LEARNER_TOKEN = "rehearsal-learner"
HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 2
    option redispatch
frontend chat
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
    default-server check inter 300ms fall 2 rise 2
{servers}
"""


@dataclass
class Process:
    """A dynalign process in its own process group, so kill -9 takes its engine along."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "dynalign", *self.args],
                env=self.env,
                cwd=self.log.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill9(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.popen:
            self.kill9()  # whatever of its group is left


def wait_for(condition, what: str, timeout_s: float, process: Process | None = None) -> float:
    """Seconds until `condition()` holds; polls every 50 ms (other processes' state)."""
    started = time.monotonic()
    while not condition():
        if process and process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited: {process.log.read_text()[-3000:]}")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def metric(url: str, name: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Load:
    """Clients chatting through the load balancer until stopped."""

    base_url: str
    clients: int
    accepted: list[str] = field(default_factory=list)  # record ids of answered requests
    failed: list[str] = field(default_factory=list)  # after the client's retries
    attempts: int = 0
    requests: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, client_id: int) -> None:
        from openai import OpenAI, OpenAIError

        def attempt(request: httpx.Request) -> None:
            with self.lock:
                self.attempts += 1

        http = httpx.Client(timeout=60, event_hooks={"request": [attempt]})
        client = OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=3,
                        http_client=http)  # fmt: skip
        n = 0
        while not self.stop.wait(THINK_S):
            n += 1
            try:
                response = client.chat.completions.with_raw_response.create(
                    model="dynalign",
                    max_tokens=4,
                    user=f"user-{client_id}",
                    messages=[{"role": "user", "content": f"Client {client_id}, request {n}"}],
                )
                with self.lock:
                    self.requests += 1
                    self.accepted.append(response.headers["x-dynalign-interaction-id"])
            except OpenAIError as exc:
                with self.lock:
                    self.requests += 1
                    self.failed.append(repr(exc))
        http.close()

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(self.clients)
        ]
        for t in threads:
            t.start()
        return threads


def rehearse(model: Path, work: Path, replicas: int = 3, clients: int = 2) -> dict:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy not found: apt-get install haproxy")
    store = work / "adapters"
    from tests.synthetic import publish_random

    promoted = publish_random(Registry(store), model, seed=1, scale=0.3).version
    processes: list[Process] = []
    haproxy_process = None
    load: Load | None = None
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        common = {
            **os.environ,
            "DYNALIGN_KAFKA__BOOTSTRAP": broker.bootstrap,
            "DYNALIGN_MODEL__PATH": str(model),
            "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
            "DYNALIGN_REGISTRY__STORE": str(store),
            "DYNALIGN_REGISTRY__ROLLOUT_DIR": str(work / "rollout-adapters"),
        }
        ports = [free_port() for _ in range(replicas)]
        servers = []
        for i, port in enumerate(ports):
            (work / f"replica-{i}").mkdir()
            env = {
                **common,
                "DYNALIGN_DATA_DIR": str(work / f"replica-{i}"),
                "DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY]),
                "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps(
                    {"ops": OPERATOR, "learner": LEARNER_TOKEN}
                ),
                "DYNALIGN_SERVING__USER_HASH_SALT": "one-salt-for-every-replica",
                "DYNALIGN_SERVING__RATE_LIMIT_PER_CLIENT": "1000",
            }
            if i == VICTIM:  # a long group commit: an answer sent before its fsync would be lost
                env["DYNALIGN_SERVING__OUTBOX_COMMIT_DELAY_MS"] = "400"
            log = work / f"replica-{i}" / "serve.log"
            servers.append(Process(f"replica-{i}", ["serve", "--port", str(port)], env, log))
        learner_port = free_port()
        (work / "learner").mkdir()
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        rollout_endpoints = [urls[VICTIM], *(u for i, u in enumerate(urls) if i != VICTIM)]
        learner = Process(
            "learner",
            ["learn", "--workdir", str(work / "learner" / "run")],
            {
                **common,
                "DYNALIGN_DATA_DIR": str(work / "learner"),
                "DYNALIGN_LEARNER__METRICS_PORT": str(learner_port),
                "DYNALIGN_LEARNER__GROUP_SIZE": "4",
                "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "8",
                "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
                "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "5",
                "DYNALIGN_LEARNER__MAX_USER_SHARE": "1.0",
                "DYNALIGN_GATE__ENABLED": "false",
                "DYNALIGN_LEARNER__ROLLOUT_ENDPOINTS": json.dumps(rollout_endpoints),
                "DYNALIGN_LEARNER__ROLLOUT_TOKEN": LEARNER_TOKEN,
            },
            work / "learner" / "learn.log",
        )
        try:
            # One at a time before any load: a vLLM CPU engine starting beside busy ones can
            # starve for minutes.
            for server, url in zip(servers, urls, strict=True):
                processes.append(server.start())
                wait_for(lambda u=url: healthy(u), f"{server.name} healthy", 300, server)
            processes.append(learner.start())
            wait_for(lambda: "learner: metrics on" in learner.log.read_text(errors="replace"),
                     "the learner", 300, learner)  # fmt: skip
            lb_port = free_port()
            config = work / "haproxy.cfg"
            config.write_text(
                HAPROXY_CONFIG.format(
                    port=lb_port,
                    servers="\n".join(
                        f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(ports)
                    ),
                )
            )
            with (work / "haproxy.log").open("wb") as haproxy_log:
                command = [haproxy, "-f", str(config), "-db"]
                haproxy_process = subprocess.Popen(
                    command, stdout=haproxy_log, stderr=subprocess.STDOUT
                )
            lb = f"http://127.0.0.1:{lb_port}"
            wait_for(lambda: healthy(lb), "haproxy", 30)
            learner_url = f"http://127.0.0.1:{learner_port}"
            wait_for(lambda: metric(learner_url, "dynalign_learner_steps_total") is not None,
                     "learner up", 300, learner)  # fmt: skip

            load = Load(lb, clients)
            threads = load.start()
            started = time.monotonic()
            events = []

            # The replica the learner rolls out on dies (engine and all) mid-request, with a
            # step in flight, and comes back on its outbox.
            wait_for(lambda: len(load.accepted) >= 10, "traffic", 120)
            wait_for(lambda: metric(learner_url, "dynalign_learner_step_in_flight") == 1,
                     "a learner step in flight", 300, learner)  # fmt: skip
            # Killed the moment it has streamed an answer of its own (and with others in flight):
            # the answer's record must survive, since the client has it.
            victim = servers[VICTIM]
            last_words = f"last words {time.time()}"
            request = httpx.Request(
                "POST",
                f"{urls[VICTIM]}/v1/chat/completions",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"model": "dynalign", "max_tokens": 2, "stream": True,
                      "messages": [{"role": "user", "content": last_words}]},
            )  # fmt: skip
            with httpx.Client(timeout=60) as direct:
                streamed = direct.send(request).text
            victim.kill9()
            assert streamed.rstrip().endswith("[DONE]"), streamed
            events.append({"event": f"kill -9 {victim.name}", "at_s": time.monotonic() - started})

            # Its requests go to the next replica: a retry, not a lost step.
            wait_for(lambda: metric(learner_url, "dynalign_learner_rollout_failovers_total"),
                     "the learner's failover", 300, learner)  # fmt: skip
            failovers = metric(learner_url, "dynalign_learner_rollout_failovers_total")

            def converged(version: int, replicas: list[str]) -> bool:
                return all(metric(u, "dynalign_live_adapter_version") == version for u in replicas)

            # While it is down an operator promotes with the CLI (files + control topic); the
            # live replicas follow, and the victim comes back serving the new version.
            alive = [u for i, u in enumerate(urls) if i != VICTIM]
            subprocess.run(
                [sys.executable, "-m", "dynalign", "adapters", "promote", str(promoted),
                 "--store", str(store), "--kafka", broker.bootstrap, "--reason", "rehearsal"],
                env=common, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            t0 = time.monotonic()
            wait_for(lambda: converged(promoted, alive), "promote on the live replicas", 30)
            promote_s = time.monotonic() - t0
            victim.start()
            back = wait_for(lambda: healthy(urls[VICTIM]), "replica back", 300, victim)
            events.append({"event": f"{victim.name} healthy again", "after_s": round(back, 1)})
            restarted_on_live = metric(urls[VICTIM], "dynalign_live_adapter_version") == promoted

            # The learner dies after a version and comes back from its checkpoint.
            def versions() -> int:
                return len(Registry(store).versions())

            wait_for(lambda: versions() >= 2, "a learner version", 300, learner)
            learner.kill9()
            published = versions()
            events.append({"event": "kill -9 learner", "at_s": time.monotonic() - started})
            learner.start()
            back = wait_for(lambda: versions() > published, "a version after", 300, learner)
            events.append({"event": "learner published again", "after_s": round(back, 1)})

            # A rollback through one replica's admin API: every replica follows.
            t0 = time.monotonic()
            operator = {"Authorization": f"Bearer {OPERATOR}"}
            rollback = httpx.post(
                f"{urls[-1]}/admin/adapters/rollback", json={}, headers=operator, timeout=60
            )
            rollback.raise_for_status()
            wait_for(lambda: converged(0, urls), "rollback everywhere", 30)
            rollback_s = time.monotonic() - t0

            load.stop.set()
            for t in threads:
                t.join(timeout=120)
            for u in urls:  # every accepted record reaches the broker
                wait_for(lambda u=u: metric(u, "dynalign_outbox_depth_records") == 0,
                         "outbox drained", 120)  # fmt: skip
            topic = KafkaConfig().interactions_topic
            records = [
                json.loads(m.value)
                for m in read_range(broker.bootstrap, topic,
                                    *range_offsets(broker.bootstrap, topic, None, None))
            ]  # fmt: skip
            logged = [r["id"] for r in records]
            registry = Registry(store)
            trained = [
                (key, offset)
                for v in registry.versions()
                for key, (first, last) in registry.manifest(v).trained_offsets.items()
                for offset in range(first, last + 1)
            ]
            return {
                "benchmark": "scaleout",
                "replicas": replicas,
                "clients": clients,
                "seconds": round(time.monotonic() - started, 1),
                "requests": load.requests,
                "failed_after_retries": len(load.failed),
                "failures": load.failed[:5],
                "retried_attempts": load.attempts - load.requests,
                "accepted": len(load.accepted),
                "lost": len(set(load.accepted) - set(logged)),
                "killed_replicas_last_answer_logged": any(
                    r["messages"][-1]["content"] == last_words for r in records
                ),
                "duplicates_in_topic": len(logged) - len(set(logged)),
                "promote_converged_s": round(promote_s, 3),
                "restarted_replica_serves_live": restarted_on_live,
                "rollback_converged_s": round(rollback_s, 3),
                "learner_versions": len(registry.versions()) - 1,
                "learner_rollout_failovers": failovers,
                "offsets_trained_twice": len(trained) - len(set(trained)),
                "events": events,
            }
        finally:
            if load is not None:
                load.stop.set()
            if haproxy_process:
                haproxy_process.terminate()
                haproxy_process.wait()
            for process in processes:
                process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Default: the tiny test model.")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/scaleout.json")
    args = parser.parse_args()
    from shared.assets import tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        result = rehearse(args.model or tiny_model_dir(), Path(tmp), args.replicas, args.clients)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
