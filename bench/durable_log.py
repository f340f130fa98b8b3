"""The embedded log's start-up cost: `dynalign up` re-seeds its in-memory broker from the
outbox's retained segments (serving/outbox.py, Outbox.reseed). Writes JSON.

    python bench/durable_log.py                      # 1k, 10k and 50k records
    python bench/durable_log.py --records 200000

For each size: a real outbox (retain) forwards that many interaction records of a typical chat's
size to a real Tansu broker; the broker is stopped and a fresh one started, as when `up`
restarts; then the time for reseed() to give it every record back, the records per second, the
bytes on disk, and whether every partition ended at the offset it had.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.outbox import Outbox  # noqa: E402
from shared.config import KafkaConfig  # noqa: E402
from shared.kafka import EmbeddedBroker, ensure_topics, producer, range_offsets  # noqa: E402
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage  # noqa: E402

TOPIC = KafkaConfig().interactions_topic
QUESTION = "How could our neighbourhood council share tools and skills fairly? " * 6
ANSWER = "Start with an inventory of what people can lend, then agree on simple rules. " * 12


def record(i: int) -> InteractionRecord:
    now = datetime.now(UTC)
    return InteractionRecord(
        conversation_id=f"conversation-{i % 97}",
        created_at=now,
        served_at=now,
        model_alias="dynalign",
        adapter_version=None,
        user_hash=f"user-{i % 13}",
        messages=[{"role": "user", "content": f"{i}: {QUESTION}"}],
        response=[Choice(index=0, content=ANSWER, finish_reason="stop")],
        sampling=SamplingParams(),
        usage=Usage(prompt_tokens=90, completion_tokens=200, total_tokens=290),
        latency_ms=900.0,
        ttft_ms=None,
        finish_reason="stop",
    )


def outbox(directory: Path, bootstrap: str) -> Outbox:
    def connect():
        ensure_topics(KafkaConfig(bootstrap=bootstrap))
        return producer(bootstrap, **EmbeddedBroker.PRODUCER_OPTIONS)  # as `up` sends

    return Outbox(directory, TOPIC, connect, retain=True)


def measure(records: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with EmbeddedBroker() as first:
            box = outbox(directory, first.bootstrap).start()
            started = time.monotonic()
            for i in range(records):
                box.append(record(i))
                if i % 5000 == 4999:  # the outbox's queue holds 10k: let the writer keep up
                    box.wait_drained(timeout_s=600)
            assert box.wait_drained(timeout_s=600), "not forwarded"
            forward_s = time.monotonic() - started
            box.close()
        size = sum(p.stat().st_size for p in directory.glob("segment-*.jsonl"))
        with EmbeddedBroker() as second:
            reseeded = outbox(directory, second.bootstrap).reseed()
            first, end = range_offsets(second.bootstrap, TOPIC, None, None)
    assert reseeded.records == records
    assert sum(end.values()) - sum(first.values()) == records, "some records are not readable"
    return {
        "records": records,
        "bytes_on_disk": size,
        "first_forwarded_s": round(forward_s, 2),
        "reseed_s": round(reseeded.seconds, 2),
        "reseed_records_per_s": round(records / reseeded.seconds),
        "reseed_mb_per_s": round(size / reseeded.seconds / 1e6, 1),
        "offsets_match": reseeded.offsets_match,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/durable_log.json")
    args = parser.parse_args()
    runs = []
    for n in args.records:
        runs.append(measure(n))
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "durable_log",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "record_bytes": round(runs[-1]["bytes_on_disk"] / runs[-1]["records"]),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
