"""`dynalign log export` on a real Kafka-protocol broker: offset and time ranges, a garbled
record kept as text, no consumer group touched, a bad bound refused."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics

pytestmark = pytest.mark.slow

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def export(bootstrap: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynalign", "log", "export", "--kafka", bootstrap, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_by_offsets_and_by_time_reads_only_the_range():
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap=broker.bootstrap, partitions=2)
        ensure_topics(cfg)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(8):  # records 0..7, one a minute, alternating partitions
            value = json.dumps({"record_id": f"r{i}"}).encode() if i != 5 else b"\xffnot json"
            moment = T0 + timedelta(minutes=i)
            producer.send(
                cfg.interactions_topic,
                value=value,
                partition=i % 2,
                timestamp_ms=int(moment.timestamp() * 1000),
            ).get(timeout=30)
        producer.close()

        everything = export(broker.bootstrap)
        assert everything.returncode == 0, everything.stderr
        lines = [json.loads(line) for line in everything.stdout.splitlines()]
        assert len(lines) == 8 and "8 records" in everything.stderr
        assert {(x["partition"], x["offset"]) for x in lines} == {(i % 2, i // 2) for i in range(8)}
        garbled = next(x for x in lines if x["partition"] == 1 and x["offset"] == 2)
        assert garbled["record"].endswith("not json")  # kept, not dropped

        by_offset = export(broker.bootstrap, "--from", "1", "--to", "3")
        records = [json.loads(row)["record"] for row in by_offset.stdout.splitlines()]
        ids = sorted(r["record_id"] if isinstance(r, dict) else "garbled" for r in records)
        assert ids == ["garbled", "r2", "r3", "r4"]  # offsets 1 and 2 of both partitions

        # Minutes 2..5 (end exclusive), as a time range in another zone: records 2, 3, 4, 5.
        start = (T0 + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")  # naive: UTC
        end = (T0 + timedelta(minutes=6)).astimezone(timezone(timedelta(hours=1))).isoformat()
        by_time = export(broker.bootstrap, "--from", start, "--to", end)
        assert by_time.returncode == 0, by_time.stderr
        got = sorted(json.loads(row)["time"] for row in by_time.stdout.splitlines())
        assert got == [(T0 + timedelta(minutes=m)).isoformat() for m in (2, 3, 4, 5)]

        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            assert not admin.list_groups()  # read without a consumer group
        finally:
            admin.close()

        bad = export(broker.bootstrap, "--from", "yesterday")
        assert bad.returncode == 2 and "'yesterday'" in bad.stdout + bad.stderr
