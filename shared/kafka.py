"""Kafka plumbing shared by the server, the learner and the control plane.

Code speaks only the Kafka protocol (kafka-python), so the same paths run against Apache Kafka
(KRaft) in deployment and against the embedded Tansu broker on one machine.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, TopicAlreadyExistsError

from shared.config import KafkaConfig
from shared.process import die_with_parent

# A consumer group's first join waits out these timeouts; the client defaults made it ~23 s.
FAST_GROUP_TIMEOUTS = dict(
    session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=300_000
)


def topic_specs(cfg: KafkaConfig) -> dict[str, dict[str, Any]]:
    """The project's topics as ensure_topics creates them."""
    durability = {"min.insync.replicas": str(cfg.min_insync_replicas)}
    # The dead-letter topic takes the same records as the interactions topic.
    records = {**durability, "max.message.bytes": str(cfg.max_message_bytes)}
    wanted = {
        cfg.interactions_topic: {"num_partitions": cfg.partitions, "configs": records},
        cfg.dlq_topic: {"num_partitions": 1, "configs": records},
        # Ratings, keyed by (interaction, choice, rater): compaction keeps each rater's last.
        cfg.feedback_topic: {
            "num_partitions": cfg.partitions,
            "configs": {**records, "cleanup.policy": "compact"},
        },
        # The control feed: keyed by adapter/alias, compaction keeps the latest state per key.
        cfg.adapters_topic: {
            "num_partitions": 1,
            "configs": {**durability, "cleanup.policy": "compact"},
        },
    }
    return {
        name: {**spec, "replication_factor": cfg.replication_factor}
        for name, spec in wanted.items()
    }


def ensure_topics(cfg: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Create the project's topics if absent (idempotent; safe from every process at start-up)."""
    admin = _retry_connect(lambda: KafkaAdminClient(bootstrap_servers=cfg.bootstrap), timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = {name: spec for name, spec in topic_specs(cfg).items() if name not in existing}
        if missing:
            result = admin.create_topics(missing, raise_errors=False)
            # "Already exists": another process won the race. Anything else (a replication
            # factor the cluster cannot meet, a refused config) must not pass silently.
            refused = {
                topic["name"]: topic["error_message"] or topic["error_code"]
                for topic in result["topics"]
                if topic["error_code"] not in (0, TopicAlreadyExistsError.errno)
            }
            if refused:
                raise KafkaError(f"cannot create topics: {refused}")
            admin.wait_for_topics(list(missing))
    finally:
        admin.close()


def _retry_connect(factory, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return factory()
        except KafkaError:  # no broker reachable yet (the name varies across versions)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """acks=all with idempotence: a batch the client retries is never written twice by the
    broker. Asked for explicitly, so that an override that conflicts with it (acks=1, ...) raises
    instead of switching it off with a warning. Keys and values are bytes; callers serialise.
    Records up to kafka.max_message_bytes need `max_request_size` set to it (the client's default
    equals the config's)."""
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    options.update(overrides)
    return KafkaProducer(**options)


def consumer(bootstrap: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **(FAST_GROUP_TIMEOUTS if group_id else {}),
    )
    options.update(overrides)
    return KafkaConsumer(**options)


# Ports are handed out from below the kernel's ephemeral range: a port from bind(0) comes from
# that range, and between handing it out and its server's bind any outgoing connection (a Kafka
# client, an engine's ZMQ socket) may be given it; CI lost a scale-out replica so.
EXPLICIT_PORTS_FLOOR = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_draws = random.Random()  # its own: a caller's random.seed() must not make processes collide


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that this process has not handed out before."""
    try:
        ceiling = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the kernel's choice is all there is
        ceiling = EXPLICIT_PORTS_FLOOR
    while True:
        port = (
            _draws.randrange(EXPLICIT_PORTS_FLOOR, ceiling) if ceiling > EXPLICIT_PORTS_FLOOR else 0
        )
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass
class EmbeddedBroker:
    """Tansu (Kafka protocol, in-memory storage) as a child process, for `dynalign up` and tests.

    In-memory means it keeps nothing across its own restart: the interaction outbox and the
    adapter registry's files are what make the system converge again."""

    # Tansu 0.6 reports a partition's end one short after a batch of several records: the last
    # stays unread until the next batch, and a learner checkpointed past that end reads the
    # topic again from 0. One record per batch (kafka-python's batches always take one).
    PRODUCER_OPTIONS: ClassVar[dict[str, Any]] = {"batch_size": 1}

    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        from shared.assets import tansu_binary

        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,  # a SIGKILLed `up` or test leaves no broker behind
        )
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tansu did not listen on {self.port} in {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


__all__ = [
    "EmbeddedBroker",
    "KafkaError",
    "ensure_topics",
    "free_port",
    "consumer",
    "producer",
    "topic_specs",
]


Bound = int | datetime  # an offset (in every partition) or a time


def range_offsets(
    bootstrap: str, topic: str, start: Bound | None, end: Bound | None
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """[start, end) of `topic` as offsets per partition: where reading begins, where it stops.
    A time means Kafka's offsets-for-times: the first record stamped at or after it."""
    reader = consumer(bootstrap, None)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic))]
        first, last = reader.beginning_offsets(partitions), reader.end_offsets(partitions)

        def at(bound: Bound | None, default: dict[TopicPartition, int]) -> dict:
            if bound is None:
                return default
            if isinstance(bound, int):
                return {tp: min(max(bound, first[tp]), last[tp]) for tp in partitions}
            # The broker's answer is where to look from, not the answer: Tansu indexes the time
            # it appended a record (and answers 0 for later times), which is never earlier in
            # the log than the first record stamped at or after `bound`.
            answer = reader.offsets_for_times({tp: _ms(bound) for tp in partitions})
            hint = {
                tp: last[tp] if a is None else max(a.offset, first[tp]) for tp, a in answer.items()
            }
            found: dict[TopicPartition, int] = {}
            for message in read_range(bootstrap, topic, hint, last):
                tp = TopicPartition(topic, message.partition)
                if tp not in found and message.timestamp >= _ms(bound):
                    found[tp] = message.offset
                    if len(found) == len(partitions):
                        break
            return {tp: found.get(tp, last[tp]) for tp in partitions}

        begin = at(start, first)
        stop = {tp: max(offset, begin[tp]) for tp, offset in at(end, last).items()}
    finally:
        reader.close()
    return begin, stop


def read_range(
    bootstrap: str,
    topic: str,
    begin: dict[TopicPartition, int],
    stop: dict[TopicPartition, int],
    idle_timeout_s: float = 30.0,
) -> Iterator[ConsumerRecord]:
    """The records at offsets [begin, stop) of each partition, in offset order per partition.
    No consumer group: no one's committed offsets move. `idle_timeout_s` without a record while
    some are due raises TimeoutError."""
    due = {tp: s for tp, s in stop.items() if begin.get(tp, s) < s}
    if not due:
        return
    reader = consumer(bootstrap, None)
    try:
        reader.assign(list(due))
        for tp in due:
            reader.seek(tp, begin[tp])
        idle_since = time.monotonic()
        while due:
            batches = reader.poll(timeout_ms=500)
            if not batches and time.monotonic() - idle_since > idle_timeout_s:
                raise TimeoutError(f"{topic}: nothing read for {idle_timeout_s}s; due: {due}")
            for tp, messages in batches.items():
                idle_since = time.monotonic()
                yield from (m for m in messages if tp in due and m.offset < due[tp])
                if tp in due and reader.position(tp) >= due[tp]:
                    del due[tp]
                    reader.pause(tp)
    finally:
        reader.close()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def parse_bound(text: str) -> Bound:
    """An offset ("120") or an ISO time ("2026-12-03T10:00", UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
