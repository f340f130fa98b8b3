"""KafkaPromptSource on a real Kafka-protocol broker (no engine): committing after a step longer
than the consumer-group timeouts, and reading partitions that appear later."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
from kafka import KafkaAdminClient, KafkaProducer

import shared.kafka
from learner.consumer import KafkaPromptSource, PromptFilter
from shared.config import DynalignConfig, load_config
from shared.kafka import EmbeddedBroker, ensure_topics
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage

pytestmark = pytest.mark.slow


@pytest.fixture()
def cfg():
    """A fresh broker per test: the topic holds exactly what the test produced, in one
    partition, so the order of reading is the order of producing."""
    with EmbeddedBroker() as broker:
        config = load_config(kafka={"bootstrap": broker.bootstrap, "partitions": 1},
                             learner={"consumer_group": f"test-{uuid.uuid4().hex[:6]}",
                                      "max_user_share": 0.5})
        ensure_topics(config.kafka)
        yield config


def produce(cfg: DynalignConfig, *prompts: tuple[str, str]) -> None:
    """(principal, text) records, as the server's outbox writes them."""
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap)
    now = datetime.now(timezone.utc)
    for principal, text in prompts:
        record = InteractionRecord(
            conversation_id=uuid.uuid4().hex, created_at=now, served_at=now,
            model_alias="dynalign", adapter_version=None, user_hash=principal,
            principal_hash=principal, messages=[{"role": "user", "content": text}],
            response=[Choice(index=0, content="ok")], sampling=SamplingParams(), usage=Usage(),
            latency_ms=1.0, ttft_ms=None, finish_reason="stop")
        producer.send(cfg.kafka.interactions_topic, key=record.conversation_id.encode(),
                      value=record.model_dump_json().encode(),
                      headers=[("schema-version", b"2")]).get(timeout=30)
    producer.close()


def source(cfg: DynalignConfig) -> KafkaPromptSource:
    prompt_filter = PromptFilter(lambda messages: None, window=1000,
                                 max_user_share=cfg.learner.max_user_share)
    return KafkaPromptSource(cfg, prompt_filter, poll_timeout_s=0.2)


def texts(batch) -> list[str]:
    return [p.messages[0]["content"] for p in batch]


def committed(cfg: DynalignConfig) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap)
    try:
        group = cfg.learner.consumer_group
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {f"{tp.topic}:{tp.partition}": meta.offset for tp, meta in offsets.items()
            if meta.offset >= 0}


# -- 2. a step longer than max_poll_interval_ms ---------------------------------------------------
def test_commit_succeeds_after_a_step_longer_than_max_poll_interval(cfg, monkeypatch):
    """Subscribed to a group, a learner whose step outlasted max_poll_interval_ms was dropped
    from the group, and its post-checkpoint commit failed (CommitFailedError)."""
    for name, ms in (("session_timeout_ms", 2000), ("heartbeat_interval_ms", 500),
                     ("max_poll_interval_ms", 2000)):
        monkeypatch.setitem(shared.kafka.FAST_GROUP_TIMEOUTS, name, ms)
    produce(cfg, *[(f"p{i}", f"prompt {i}") for i in range(4)])
    src = source(cfg)
    try:
        batch = src.next_batch(2)
        time.sleep(2 * 2000 / 1000)  # the "step": twice max_poll_interval_ms without a poll
        src.commit(batch.next_offsets)
        assert committed(cfg) == batch.next_offsets
        # The next batch continues after it, and its commit succeeds too.
        second = src.next_batch(2)
        assert not set(texts(batch.prompts)) & set(texts(second.prompts))
        src.commit(second.next_offsets)
        assert committed(cfg) == second.next_offsets
        assert sum(second.next_offsets.values()) == 4
    finally:
        src.close()


def test_partitions_that_appear_later_are_read():
    """Partitions are assigned, not handed out by a group: a learner started before its topic
    exists (or before partitions are added) picks up every partition once it does."""
    with EmbeddedBroker() as broker:
        cfg = load_config(kafka={"bootstrap": broker.bootstrap, "partitions": 3},
                          learner={"max_user_share": 1.0})
        src = source(cfg)
        try:
            assert src.next_batch(1, max_idle_polls=2) is None  # no topic yet
            ensure_topics(cfg.kafka)
            produce(cfg, *[(f"p{i}", f"prompt {i}") for i in range(12)])
            batch = src.next_batch(12, max_idle_polls=20)
            assert sorted(texts(batch.prompts)) == sorted(f"prompt {i}" for i in range(12))
            assert len(src.consumer.assignment()) == 3
        finally:
            src.close()
