"""KafkaPromptSource on a real Kafka-protocol broker (no engine): committing after a step longer
than the consumer-group timeouts, and the per-principal share cap deferring prompts (durably)
instead of dropping them."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

import pytest
from kafka import KafkaAdminClient, KafkaProducer

import shared.kafka
from learner import metrics
from learner.checkpoint import CheckpointState
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
        config = load_config(
            kafka={"bootstrap": broker.bootstrap, "partitions": 1},
            learner={"consumer_group": f"test-{uuid.uuid4().hex[:6]}", "max_user_share": 0.5},
        )
        ensure_topics(config.kafka)
        yield config


def produce(cfg: DynalignConfig, *prompts: tuple[str, str]) -> None:
    """(principal, text) records, as the server's outbox writes them."""
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap)
    now = datetime.now(UTC)
    for principal, text in prompts:
        record = InteractionRecord(
            conversation_id=uuid.uuid4().hex,
            created_at=now,
            served_at=now,
            model_alias="dynalign",
            adapter_version=None,
            user_hash=principal,
            principal_hash=principal,
            messages=[{"role": "user", "content": text}],
            response=[Choice(index=0, content="ok")],
            sampling=SamplingParams(),
            usage=Usage(),
            latency_ms=1.0,
            ttft_ms=None,
            finish_reason="stop",
        )
        producer.send(
            cfg.kafka.interactions_topic,
            key=record.conversation_id.encode(),
            value=record.model_dump_json().encode(),
            headers=[("schema-version", b"2")],
        ).get(timeout=30)
    producer.close()


def source(cfg: DynalignConfig, **resume) -> KafkaPromptSource:
    prompt_filter = PromptFilter(
        lambda messages: None, remembered_keys=1000, max_user_share=cfg.learner.max_user_share
    )
    return KafkaPromptSource(cfg, prompt_filter, poll_timeout_s=0.2, **resume)


def texts(batch) -> list[str]:
    return [p.messages[0]["content"] for p in batch]


def committed(cfg: DynalignConfig) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap)
    try:
        group = cfg.learner.consumer_group
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {
        f"{tp.topic}:{tp.partition}": meta.offset
        for tp, meta in offsets.items()
        if meta.offset >= 0
    }


# -- 2. a step longer than max_poll_interval_ms ---------------------------------------------------
def test_commit_succeeds_after_a_step_longer_than_max_poll_interval(cfg, monkeypatch):
    """Subscribed to a group, a learner whose step outlasted max_poll_interval_ms was dropped
    from the group, and its post-checkpoint commit failed (CommitFailedError)."""
    for name, ms in (
        ("session_timeout_ms", 2000),
        ("heartbeat_interval_ms", 500),
        ("max_poll_interval_ms", 2000),
    ):
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


# -- 4. the share cap defers --------------------------------------------------------------------
def test_a_lone_principal_is_deferred_and_batched_once_another_arrives(cfg, caplog):
    src = source(cfg)  # 2 prompts per batch, at most 1 per principal
    try:
        produce(cfg, ("alone", "a1"), ("alone", "a2"), ("alone", "a3"))
        with caplog.at_level(logging.INFO, logger="learner.consumer"):
            assert src.next_batch(2, max_idle_polls=5) is None  # five idle polls: no batch
        waiting = [r for r in caplog.records if "more principals" in r.getMessage()]
        assert len(waiting) == 1, "said once, not per poll"
        assert "at most 1 from one principal" in waiting[0].getMessage()
        assert metrics.WAITING_ON_SHARE_CAP._value.get() == 1
        assert metrics.DEFERRED_PROMPTS._value.get() == 3  # nothing dropped

        produce(cfg, ("other", "b1"), ("other", "b2"))
        first, second = src.next_batch(2), src.next_batch(2)
        assert texts(first.prompts) == ["a1", "b1"]  # the deferred prompt, oldest first
        assert texts(second.prompts) == ["a2", "b2"]
        assert texts(second.deferred) == ["a3"]  # what a checkpoint after it keeps
        assert metrics.WAITING_ON_SHARE_CAP._value.get() == 0
        assert metrics.DEFERRED_PROMPTS._value.get() == 1
    finally:
        src.close()


def test_deferred_prompts_survive_a_restart_through_the_checkpoint(cfg):
    produce(cfg, ("alone", "a1"), ("alone", "a2"), ("other", "b1"))
    src = source(cfg)
    try:
        batch = src.next_batch(2)
        assert texts(batch.prompts) == ["a1", "b1"]
    finally:
        src.close()
    # The learner checkpoints the batch's position and commits its offsets, which have moved
    # past "a2": only the checkpoint still holds it.
    state = CheckpointState.model_validate_json(
        CheckpointState(
            step=1, next_offsets=batch.next_offsets, deferred=batch.deferred
        ).model_dump_json()
    )
    produce(cfg, ("other", "b2"))
    resumed = source(cfg, start_offsets=state.next_offsets, deferred=state.deferred)
    try:
        assert texts(resumed.next_batch(2).prompts) == ["a2", "b2"]
    finally:
        resumed.close()


def test_deferral_is_bounded_and_the_busiest_principal_gives_way(cfg):
    cfg.learner.max_deferred_prompts = 3
    skipped = metrics.RECORDS_SKIPPED.labels("deferred_overflow")._value.get()
    produce(cfg, *[("busy", f"a{i}") for i in range(5)], ("other", "b1"))
    src = source(cfg)
    try:
        # Three deferred at most: a0, a1, a2 made way in turn (the busiest principal's oldest),
        # and b1, the prompt a batch was waiting for, got in.
        assert texts(src.next_batch(2).prompts) == ["a3", "b1"]
        assert metrics.RECORDS_SKIPPED.labels("deferred_overflow")._value.get() == skipped + 3
    finally:
        src.close()


def test_partitions_that_appear_later_are_read():
    """Partitions are assigned, not handed out by a group: a learner started before its topic
    exists (or before partitions are added) picks up every partition once it does."""
    with EmbeddedBroker() as broker:
        cfg = load_config(
            kafka={"bootstrap": broker.bootstrap, "partitions": 3}, learner={"max_user_share": 1.0}
        )
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


# -- offsets the topic no longer holds (issue 13) ------------------------------------------------
def test_a_checkpoint_past_the_end_of_a_recreated_topic_reads_every_new_record(cfg):
    """The checkpoint read 3 records of the topic's earlier life (an in-memory broker since
    restarted); the new topic holds 2, both new: both are read, the reset is counted."""
    resets = metrics.OFFSET_RESETS.labels("ahead_of_end")._value.get()
    produce(cfg, ("a", "after-restart-1"), ("b", "after-restart-2"))
    src = source(cfg, start_offsets={f"{cfg.kafka.interactions_topic}:0": 3})
    try:
        batch = src.next_batch(2, max_idle_polls=20)
        assert batch is not None and texts(batch.prompts) == ["after-restart-1", "after-restart-2"]
        assert batch.next_offsets == {f"{cfg.kafka.interactions_topic}:0": 2}
    finally:
        src.close()
    assert metrics.OFFSET_RESETS.labels("ahead_of_end")._value.get() == resets + 1
