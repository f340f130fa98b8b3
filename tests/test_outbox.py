"""The interaction outbox against a real Kafka-protocol broker: durable while the broker is away,
recovered after a crash, never re-sent once acknowledged."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaConfigurationError

from serving.outbox import Outbox
from shared.config import DynalignConfig, KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics, free_port, producer, topic_specs
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage
from tests.conftest import read_records

TOPIC = KafkaConfig().interactions_topic


def record(conversation: str, text: str) -> InteractionRecord:
    now = datetime.now(timezone.utc)
    return InteractionRecord(
        conversation_id=conversation, created_at=now, served_at=now, model_alias="m",
        adapter_version=None, user_hash="u", messages=[{"role": "user", "content": text}],
        response=[Choice(index=0, content="ok", finish_reason="stop")],
        sampling=SamplingParams(), usage=Usage(), latency_ms=1.0, ttft_ms=None,
        finish_reason="stop",
    )


def outbox_for(directory, bootstrap: str) -> Outbox:
    def connect():
        ensure_topics(KafkaConfig(bootstrap=bootstrap), timeout_s=2)
        return producer(bootstrap, max_block_ms=1000, request_timeout_ms=1000,
                        delivery_timeout_ms=2000)

    return Outbox(directory, TOPIC, connect, fsync_interval_ms=10)


def test_records_survive_broker_absence_and_a_crash(tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    first = outbox_for(tmp_path, bootstrap).start()  # no broker listens yet
    for i in range(5):
        first.append(record("c-crash", f"m{i}"))
    first.close(drain_timeout_s=0.5)  # nothing acknowledged: all 5 stay on disk
    assert first.depth == 5
    segment = next(tmp_path.glob("segment-*.jsonl"))
    assert len(segment.read_bytes().splitlines()) == 5
    with segment.open("ab") as f:
        f.write(b'{"id": "torn-by-a-crash"')  # a half-written line, as after SIGKILL

    with EmbeddedBroker(port=port):
        second = outbox_for(tmp_path, bootstrap)
        assert second.depth == 5  # recovered from disk, the torn line cut
        second.start()
        assert second.wait_drained(timeout_s=30)
        second.close()
        found = read_records(bootstrap, TOPIC, lambda r: r["conversation_id"] == "c-crash",
                             expected=5, settle_s=0.5)
        texts = [r["messages"][0]["content"] for r, _ in found]
        assert sorted(texts) == [f"m{i}" for i in range(5)]

        # Acknowledged records are never sent again after another restart.
        third = outbox_for(tmp_path, bootstrap)
        assert third.depth == 0
        third.start()
        third.append(record("c-crash", "m5"))
        assert third.wait_drained(timeout_s=30)
        third.close()
        found = read_records(bootstrap, TOPIC, lambda r: r["conversation_id"] == "c-crash",
                             expected=6, settle_s=1.0)
        assert len(found) == 6


def test_acknowledged_segments_are_trimmed(tmp_path):
    with EmbeddedBroker() as broker:
        box = Outbox(tmp_path, TOPIC, lambda: producer(broker.bootstrap), fsync_interval_ms=5,
                     segment_bytes=2000)  # a few records per segment
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        box.start()
        for i in range(30):
            box.append(record("c-trim", f"m{i}"))
        assert box.wait_drained(timeout_s=30)
        box.close()
    # Only the segment being written may remain; everything behind the cursor is gone.
    assert len(list(tmp_path.glob("segment-*.jsonl"))) <= 2


def test_the_producer_is_idempotent_with_acks_all():
    with EmbeddedBroker() as broker:
        p = producer(broker.bootstrap)
        try:
            assert p.config["enable_idempotence"] and p.config["acks"] == -1
            p.send(TOPIC, value=b"v").get(timeout=10)
            # The broker gave the producer an id: idempotence is in effect, not silently off.
            assert p._transaction_manager.producer_id_and_epoch.producer_id >= 0
        finally:
            p.close()
        # An override that would switch idempotence off is refused, not obeyed silently.
        with pytest.raises(KafkaConfigurationError):
            producer(broker.bootstrap, acks=1)


def test_topics_take_replication_and_size_limits_from_the_config(monkeypatch):
    monkeypatch.delenv("DYNALIGN_CONFIG", raising=False)
    monkeypatch.setenv("DYNALIGN_KAFKA__REPLICATION_FACTOR", "3")
    monkeypatch.setenv("DYNALIGN_KAFKA__MIN_INSYNC_REPLICAS", "2")
    monkeypatch.setenv("DYNALIGN_KAFKA__TOPIC_PREFIX", f"t{uuid.uuid4().hex[:6]}")
    cfg = DynalignConfig().kafka
    specs = topic_specs(cfg)
    assert {name: spec["replication_factor"] for name, spec in specs.items()} == \
        {cfg.interactions_topic: 3, cfg.dlq_topic: 3, cfg.adapters_topic: 3}
    assert all(spec["configs"]["min.insync.replicas"] == "2" for spec in specs.values())
    assert specs[cfg.interactions_topic]["configs"]["max.message.bytes"] == "1048576"
    with EmbeddedBroker() as broker:  # one node: Tansu records the factor without replicating
        cfg = cfg.model_copy(update={"bootstrap": broker.bootstrap})
        ensure_topics(cfg)
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            described = admin.describe_topics([cfg.interactions_topic])
        finally:
            admin.close()
    assert {len(p["replica_nodes"]) for p in described[0]["partitions"]} == {3}
