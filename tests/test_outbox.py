"""The interaction outbox against a real Kafka-protocol broker and real files: durable while the
broker is away, recovered after a crash or damage, never re-sent once acknowledged, and never
stopped by one bad record, a full disk or a long outage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaConfigurationError

from serving.outbox import DEAD_LETTER_FILE, Outbox
from shared.config import DynalignConfig, KafkaConfig
from shared.kafka import (
    EmbeddedBroker,
    consumer,
    ensure_topics,
    free_port,
    producer,
    range_offsets,
    topic_specs,
)
from shared.schemas import SCHEMA_VERSION_HEADER
from tests.conftest import REPO, json_result, read_records
from tests.outbox_scenarios import TOPIC, outbox_for, record, sample, unserialisable
from tests.test_observability import ALERTS, SERVER_JOB, Prometheus, wait_for


def topic_messages(bootstrap: str, topic: str = TOPIC, timeout_s: float = 120) -> Iterator:
    """Every message in the topic, up to the end offsets at the time of the call."""
    c = consumer(bootstrap, group_id=None, max_poll_records=10_000)
    deadline = time.monotonic() + timeout_s
    try:
        while not (known := c.partitions_for_topic(topic)):
            assert time.monotonic() < deadline, f"topic {topic} never appeared"
            time.sleep(0.1)
        partitions = [TopicPartition(topic, p) for p in known]
        c.assign(partitions)
        c.seek_to_beginning(*partitions)
        end = c.end_offsets(partitions)
        while any(c.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, "the topic was not read to its end in time"
            for batch in c.poll(timeout_ms=500).values():
                yield from batch
    finally:
        c.close()


def ids_in_topic(bootstrap: str) -> Counter:
    return Counter(dict(m.headers)["record-id"].decode() for m in topic_messages(bootstrap))


def dead_letters(directory: Path) -> list[dict]:
    path = directory / DEAD_LETTER_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def closed_within(box: Outbox, timeout_s: float) -> None:
    """close() on a thread, so that a hang fails the test instead of blocking it."""
    closer = threading.Thread(target=box.close, daemon=True)
    closer.start()
    closer.join(timeout_s)
    assert not closer.is_alive(), f"close() still running after {timeout_s} s"


def run_scenario(name: str, **args) -> dict:
    """A scenario of tests/outbox_scenarios.py in its own process (this worktree's code)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.outbox_scenarios", name, json.dumps(args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-6000:]}"
    return json_result(result.stdout)


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
        found = read_records(
            bootstrap, TOPIC, lambda r: r["conversation_id"] == "c-crash", expected=5, settle_s=0.5
        )
        texts = [r["messages"][0]["content"] for r, _ in found]
        assert sorted(texts) == [f"m{i}" for i in range(5)]

        # Acknowledged records are never sent again after another restart.
        third = outbox_for(tmp_path, bootstrap)
        assert third.depth == 0
        third.start()
        third.append(record("c-crash", "m5"))
        assert third.wait_drained(timeout_s=30)
        third.close()
        found = read_records(
            bootstrap, TOPIC, lambda r: r["conversation_id"] == "c-crash", expected=6, settle_s=1.0
        )
        assert len(found) == 6


def test_acknowledged_segments_are_trimmed(tmp_path):
    with EmbeddedBroker() as broker:
        box = Outbox(
            tmp_path,
            TOPIC,
            lambda: producer(broker.bootstrap),
            commit_delay_ms=5,
            segment_bytes=2000,
        )  # a few records per segment
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        box.start()
        for i in range(30):
            box.append(record("c-trim", f"m{i}"))
        assert box.wait_drained(timeout_s=30)
        box.close()
    # Only the segment being written may remain; everything behind the cursor is gone.
    assert len(list(tmp_path.glob("segment-*.jsonl"))) <= 2


# -- one bad record ------------------------------------------------------------------------------
def test_an_unserialisable_record_is_dead_lettered_and_the_rest_flows(tmp_path):
    bad = unserialisable("c-bad")
    before = sample("dynalign_outbox_dead_lettered_total", reason="unserialisable")
    with EmbeddedBroker() as broker:
        box = outbox_for(tmp_path, broker.bootstrap).start()
        box.append(first := record("c-bad", "before"))
        box.append(bad)
        box.append(last := record("c-bad", "after"))
        assert box.wait_drained(timeout_s=30)
        closed_within(box, 20)
        assert ids_in_topic(broker.bootstrap) == Counter({first.id: 1, last.id: 1})
    [letter] = dead_letters(tmp_path)
    assert letter["reason"] == "unserialisable" and letter["record"]["id"] == bad.id
    assert letter["record"]["messages"][0]["note"] == "\ud800"  # kept, escaped as ASCII JSON
    assert sample("dynalign_outbox_dead_lettered_total", reason="unserialisable") == before + 1


def test_an_oversized_record_is_dead_lettered_and_does_not_block_the_rest(tmp_path):
    big = record("c-big", "x" * (KafkaConfig().max_message_bytes + 1000))
    before = sample("dynalign_outbox_dead_lettered_total", reason="oversized")
    with EmbeddedBroker() as broker:
        box = outbox_for(tmp_path, broker.bootstrap).start()
        box.append(first := record("c-big", "before"))
        box.append(big)
        box.append(last := record("c-big", "after"))
        assert box.wait_drained(timeout_s=30)
        closed_within(box, 20)
        assert ids_in_topic(broker.bootstrap) == Counter({first.id: 1, last.id: 1})
    [letter] = dead_letters(tmp_path)
    assert letter["reason"] == "oversized" and letter["record"]["id"] == big.id
    assert sample("dynalign_outbox_dead_lettered_total", reason="oversized") == before + 1
    # Never written to a segment: nothing but the two small records was ever on disk.
    assert sum(p.stat().st_size for p in tmp_path.glob("segment-*.jsonl")) < 10_000


def test_a_record_the_producer_refuses_is_dead_lettered_and_the_rest_flows(tmp_path):
    """Records written under a larger limit than the producer's (the limit was lowered between
    restarts): the producer refuses the big one for good; it is set aside, not retried."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    first = outbox_for(tmp_path, bootstrap, max_message_bytes=4 << 20).start()  # no broker yet
    ids = []
    for text in ("before", "x" * (2 << 20), "after"):
        first.append(r := record("c-refused", text))
        ids.append(r.id)
    first.close(drain_timeout_s=0)
    before = sample("dynalign_outbox_dead_lettered_total", reason="rejected")
    with EmbeddedBroker(port=port):
        second = outbox_for(tmp_path, bootstrap).start()  # producer: max_request_size 1 MiB
        assert second.wait_drained(timeout_s=30)
        closed_within(second, 20)
        assert ids_in_topic(bootstrap) == Counter({ids[0]: 1, ids[2]: 1})
    [letter] = dead_letters(tmp_path)
    assert letter["reason"] == "rejected" and letter["record"]["id"] == ids[1]
    assert "MessageSizeTooLarge" in letter["detail"]
    assert sample("dynalign_outbox_dead_lettered_total", reason="rejected") == before + 1


# -- the disk -------------------------------------------------------------------------------------
def test_a_full_disk_is_survived_reported_and_recovered(tmp_path):
    queue_size = 50
    with EmbeddedBroker() as broker:
        result = run_scenario(
            "disk_full", directory=str(tmp_path), bootstrap=broker.bootstrap, queue_size=queue_size
        )
        ids, during = result["ids"], result["during"]
        assert "File too large" in during["problem"] and during["problem_gauge"] == 1
        assert during["write_errors"] >= 1
        assert during["segment_size"] == result["written_before"]  # the torn line cut back
        assert result["slowest_append_s"] < 0.1  # append() never waits on the disk
        # 20 sent, 1 held by the writer, a queue's worth waiting, the rest dropped and counted.
        accepted = 21 + queue_size
        assert during["dropped"] == len(ids) - accepted
        assert result["drained"] and result["problem_gauge_after"] == 0
        # What was accepted arrives, once each; a torn line left in the segment would have
        # garbled the record written after it.
        assert ids_in_topic(broker.bootstrap) == Counter({i: 1 for i in ids[:accepted]})
    assert not dead_letters(tmp_path)


def test_close_returns_while_the_disk_refuses_writes(tmp_path):
    with EmbeddedBroker() as broker:
        result = run_scenario(
            "close_on_full_disk", directory=str(tmp_path), bootstrap=broker.bootstrap
        )
    assert result["close_s"] < 1 + 5
    assert result["dropped"] == len(result["unwritten"])  # counted as lost at shutdown
    assert result["segment_ids"] == ["close-full-persisted"]  # whole lines only


@pytest.mark.timeout(600)
def test_a_long_outage_is_forwarded_from_disk_in_bounded_memory(tmp_path):
    """100k records (about 60 MB on disk) pile up with no broker, then go out after a restart:
    memory stays bounded in both processes and every record arrives exactly once."""
    count, bound_mb = 100_000, 25
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    outage = run_scenario(
        "outage", directory=str(tmp_path), bootstrap=bootstrap, count=count, text_bytes=200
    )
    print("outage:", outage)
    assert outage["dropped"] == 0 and outage["depth"] == count
    assert (outage["peak_kb"] - outage["baseline_kb"]) / 1024 < bound_mb
    with EmbeddedBroker(port=port):
        restart = run_scenario("drain", directory=str(tmp_path), bootstrap=bootstrap)
        print("restart:", restart)
        assert restart["depth_at_start"] == count and restart["drained"]
        assert (restart["peak_kb"] - restart["baseline_kb"]) / 1024 < bound_mb
        assert ids_in_topic(bootstrap) == Counter({f"outage-{i:06d}": 1 for i in range(count)})


def test_the_outbox_alerts_fire_in_prometheus(tmp_path):
    """deploy/'s outbox alerts, evaluated by a real Prometheus on a real outbox's metrics: a
    dead-lettered record, a disk that refuses writes, the queue overflowing."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)  # fire on the first evaluation
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    port = free_port()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.outbox_scenarios",
            "alerting",
            json.dumps({"directory": str(tmp_path / "outbox"), "metrics_port": port}),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    prometheus = None
    try:
        assert child.stdout.readline().strip() == "serving"
        prometheus = Prometheus(
            tmp_path / "prometheus", {SERVER_JOB: f"127.0.0.1:{port}"}, tmp_path / "alerts.yml"
        )
        # The counters' zeros first, so that increase() sees them move.
        wait_for(
            lambda: prometheus.query("dynalign_outbox_dead_lettered_total"),
            60,
            "the first scrape",
            prometheus.log_path,
        )
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "triggered"

        expected = {
            ("DynalignOutboxDeadLettered", "unserialisable"),
            ("DynalignOutboxCannotPersist", ""),
            ("DynalignOutboxDroppedRecords", "queue_full"),
        }

        # Each alert is collected as it fires, not all in one answer: on a loaded machine a
        # scrape can miss its 1 s timeout, and the gauge's alert resolves until the next one.
        fired: set[tuple[str, str]] = set()

        def all_expected_fired() -> set[tuple[str, str]] | None:
            fired.update(
                (a["labels"]["alertname"], a["labels"].get("reason", ""))
                for a in prometheus.alerts()
                if a["state"] == "firing" and "Outbox" in a["labels"]["alertname"]
            )
            return fired if fired >= expected else None

        def diagnosis() -> str:
            return (
                f"fired so far: {sorted(fired)}; all alerts now: {prometheus.alerts()}; "
                f"scrape health: {prometheus.targets()}"
            )

        # ... and no other outbox alert.
        assert (
            wait_for(all_expected_fired, 90, "the outbox alerts", prometheus.log_path, diagnosis)
            == expected
        )
    finally:
        if prometheus:
            prometheus.stop()
        child.kill()
        child.wait()


# -- damage found at start-up ---------------------------------------------------------------------
def test_the_cursor_is_replaced_durably(tmp_path, monkeypatch):
    """The new cursor is fsynced before it is renamed over the old one, and the directory after
    (the rename itself), so a crash leaves the old cursor or the new one, never an empty file."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with EmbeddedBroker() as broker:
        box = outbox_for(tmp_path, broker.bootstrap).start()
        box.append(record("c-cursor", "m"))
        assert box.wait_drained(timeout_s=30)
        box.close()
    cursor = tmp_path / "acked.json"
    renamed = events.index(("replace", str(cursor)))
    written = [path for op, path in events[:renamed] if op == "fsync"]
    assert any(Path(path).parent == tmp_path and path != str(cursor) for path in written)
    assert ("fsync", str(tmp_path)) in events[renamed:]


@pytest.mark.parametrize(
    "damage",
    ["", '{"segm', '{"segment": 1, "offset": 99999999}'],
    ids=["empty", "garbled", "past-the-data"],
)
def test_a_damaged_cursor_resends_from_the_oldest_segment(tmp_path, caplog, damage):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    first = outbox_for(tmp_path, bootstrap).start()
    ids = []
    for i in range(3):
        first.append(r := record("c-cursor", f"m{i}"))
        ids.append(r.id)
    first.close(drain_timeout_s=0)
    (tmp_path / "acked.json").write_text(damage)
    with EmbeddedBroker(port=port), caplog.at_level(logging.WARNING, logger="serving.outbox"):
        second = outbox_for(tmp_path, bootstrap)
        assert second.depth == 3
        second.start()
        assert second.wait_drained(timeout_s=30)
        second.close()
        assert ids_in_topic(bootstrap) == Counter({i: 1 for i in ids})
    assert any(
        "acked.json" in r.getMessage() and "oldest segment" in r.getMessage()
        for r in caplog.records
    )


def test_a_garbled_segment_line_is_dead_lettered_and_the_rest_forwarded(tmp_path, caplog):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    first = outbox_for(tmp_path, bootstrap).start()
    ids = []
    for i in range(3):
        first.append(r := record("c-garbled", f"m{i}"))
        ids.append(r.id)
    first.close(drain_timeout_s=0)
    segment = next(tmp_path.glob("segment-*.jsonl"))
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[1] = b"\xff\xfe not json at all\n"  # damaged in place, as by a bad disk sector
    segment.write_bytes(b"".join(lines))
    before = sample("dynalign_outbox_dead_lettered_total", reason="garbled")
    with EmbeddedBroker(port=port), caplog.at_level(logging.WARNING, logger="serving.outbox"):
        second = outbox_for(tmp_path, bootstrap)
        second.start()
        assert second.wait_drained(timeout_s=30)
        second.close()
        assert ids_in_topic(bootstrap) == Counter({ids[0]: 1, ids[2]: 1})
    [letter] = dead_letters(tmp_path)
    assert letter["reason"] == "garbled" and "not json at all" in letter["record"]
    assert segment.name in letter["detail"]
    assert sample("dynalign_outbox_dead_lettered_total", reason="garbled") == before + 1
    assert any(
        "garbled" in r.getMessage() and segment.name in r.getMessage() for r in caplog.records
    )


# -- what goes to Kafka ---------------------------------------------------------------------------
def test_the_schema_version_header_is_the_records_own(tmp_path):
    """A v1 record left on disk by an older server goes out as v1; a new one as v2."""
    old = json.loads(record("c-schema", "old").model_dump_json())
    old["schema_version"] = 1
    del old["principal_hash"]  # v1 had no principal_hash
    (tmp_path / "segment-000001.jsonl").write_text(json.dumps(old) + "\n")
    with EmbeddedBroker() as broker:
        box = outbox_for(tmp_path, broker.bootstrap)
        box.start()
        box.append(new := record("c-schema", "new"))
        assert box.wait_drained(timeout_s=30)
        box.close()
        versions = {
            dict(m.headers)["record-id"].decode(): dict(m.headers)[SCHEMA_VERSION_HEADER].decode()
            for m in topic_messages(broker.bootstrap)
        }
    assert versions == {old["id"]: "1", new.id: "2"}


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
    assert {name: spec["replication_factor"] for name, spec in specs.items()} == {
        cfg.interactions_topic: 3,
        cfg.dlq_topic: 3,
        cfg.adapters_topic: 3,
        cfg.feedback_topic: 3,
    }
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


# -- the embedded broker's log -------------------------------------------------------------------
def topic_contents(bootstrap: str) -> dict[int, list[str]]:
    """Each partition's record ids, in offset order from offset 0."""
    c = consumer(bootstrap, group_id=None)
    try:
        partitions = [TopicPartition(TOPIC, p) for p in c.partitions_for_topic(TOPIC)]
        c.assign(partitions)
        c.seek_to_beginning(*partitions)
        ends = c.end_offsets(partitions)
        found: dict[int, list[str]] = {tp.partition: [] for tp in partitions}
        deadline = time.monotonic() + 30
        while any(c.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, "topic not read in 30 s"
            for tp, batch in c.poll(timeout_ms=200).items():
                for message in batch:
                    assert message.offset == len(found[tp.partition])  # from 0, no gap
                    found[tp.partition].append(json.loads(message.value)["id"])
        return found
    finally:
        c.close()


def test_a_retained_log_reseeds_an_empty_broker_at_the_same_offsets(tmp_path):
    """`dynalign up`'s broker keeps nothing across its restart; the outbox retains what it
    forwarded and gives it back: every record in its partition at its offset, then what was
    never sent. A line damaged on disk since is counted, and the shift it causes in its
    partition's offsets is reported."""
    with EmbeddedBroker() as first_broker:
        box = outbox_for(tmp_path, first_broker.bootstrap, retain=True, segment_bytes=3000)
        box.start()
        for i in range(40):  # several conversations: all three partitions, several segments
            box.append(record(f"c-{i % 7}", f"m{i}"))
            if i % 8 == 7:  # written in batches: a segment rolls between them
                assert box.wait_drained(timeout_s=30)
        box.close()
        before = topic_contents(first_broker.bootstrap)
    assert sum(map(len, before.values())) == 40 and all(before.values())
    assert len(list(tmp_path.glob("segment-*.jsonl"))) > 2  # retained, not trimmed
    # A line damaged on disk among the retained ones, and two records never sent.
    with sorted(tmp_path.glob("segment-*.jsonl"))[0].open("r+b") as f:
        f.seek(0)
        f.write(b"#")
    box = outbox_for(tmp_path, f"127.0.0.1:{free_port()}", retain=True)  # no broker: unsent
    box.start()
    box.append(record("c-late", "m40"))
    box.append(record("c-late", "m41"))
    box.close(drain_timeout_s=0.5)

    with EmbeddedBroker() as second_broker:  # empty, as after `dynalign up` restarts
        box = outbox_for(tmp_path, second_broker.bootstrap, retain=True)
        reseeded = box.reseed()  # the 40 acknowledged but the damaged one, then the 2 unsent
        assert (reseeded.records, reseeded.garbled, reseeded.offsets_match) == (41, 1, False)
        after = topic_contents(second_broker.bootstrap)
        kept = {i for ids in after.values() for i in ids}
        damaged = next(i for ids in before.values() for i in ids if i not in kept)
        for partition, ids in before.items():
            expected = [i for i in ids if i != damaged]
            assert after[partition][: len(expected)] == expected
        box.start()  # nothing is left to forward
        assert box.depth == 0 and box.wait_drained(timeout_s=5)
        box.close()
        assert sum(map(len, topic_contents(second_broker.bootstrap).values())) == 41
    # Damaged after it was forwarded: reported by reseed(), not set aside as a record.
    assert not (tmp_path / DEAD_LETTER_FILE).exists()


def test_an_intact_retained_log_reseeds_with_matching_offsets(tmp_path):
    with EmbeddedBroker() as broker:
        box = outbox_for(tmp_path, broker.bootstrap, retain=True)
        box.start()
        for i in range(12):
            box.append(record(f"c-{i % 5}", f"m{i}"))
        assert box.wait_drained(timeout_s=30)
        box.close()
        before = topic_contents(broker.bootstrap)
    with EmbeddedBroker() as broker:
        reseeded = outbox_for(tmp_path, broker.bootstrap, retain=True).reseed()
        assert reseeded.records == 12 and reseeded.offsets_match is True
        assert reseeded.ends == {f"{TOPIC}:{p}": len(ids) for p, ids in before.items() if ids}
        assert topic_contents(broker.bootstrap) == before


def test_one_outbox_directory_serves_one_process(tmp_path):
    """The data directory is per user now, so a second server (or `up`) started on it must
    be refused rather than interleave segments with the first."""
    from shared.files import DirectoryInUse

    first = outbox_for(tmp_path, f"127.0.0.1:{free_port()}")
    script = (
        "import sys; from tests.outbox_scenarios import outbox_for; "
        f"outbox_for(__import__('pathlib').Path({str(tmp_path)!r}), 'x:1')"
    )
    other = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert other.returncode != 0 and "DirectoryInUse" in other.stderr
    assert "in use by another dynalign process" in other.stderr
    with pytest.raises(DirectoryInUse):  # a second one in this process alike
        outbox_for(tmp_path, "x:1")
    first.close()
    outbox_for(tmp_path, "x:1").close()  # free again once closed


def test_up_reseeds_a_conversation_so_that_every_record_is_readable(tmp_path, monkeypatch):
    """Embedded Tansu reports a partition's end one short after a batch of several records: the
    last one stays unread, and a learner whose checkpoint points past that end reads the topic
    again from 0. `up`'s outbox therefore sends it one record per batch; a re-seed, which sends a
    whole window at once, is where that shows."""
    from dynalign.cli import _outbox

    monkeypatch.delenv("DYNALIGN_CONFIG", raising=False)
    cfg = DynalignConfig(serving={"outbox_dir": tmp_path / "outbox"})
    with EmbeddedBroker() as broker:
        cfg.kafka.bootstrap = broker.bootstrap
        box = _outbox(cfg, retain=True, embedded=True)
        box.start()
        for i in range(6):  # one conversation: one partition
            box.append(record("c-1", f"m{i}"))
        assert box.wait_drained(timeout_s=30)
        box.close()
    with EmbeddedBroker() as broker:
        cfg.kafka.bootstrap = broker.bootstrap
        box = _outbox(cfg, retain=True, embedded=True)
        try:
            assert box.reseed().records == 6
            first, end = range_offsets(broker.bootstrap, cfg.kafka.interactions_topic, None, None)
        finally:
            box.close()
    assert sorted(end[tp] - first[tp] for tp in end) == [0, 0, 6]
