"""Outbox scenarios that need a process of their own, run by tests/test_outbox.py:

- a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes the kernel refuse segment writes
  with EFBIG, as a full disk refuses them with ENOSPC, without touching the test process;
- memory is read from /proc/self/status (VmRSS now, VmHWM the peak) of a process that runs
  nothing but the outbox;
- the outbox's metrics are served over HTTP for a real Prometheus to evaluate the alerts.

    python -m tests.outbox_scenarios SCENARIO '{"directory": ..., "bootstrap": ...}'

prints the scenario's result as one JSON line. The record and outbox factories here are the test
module's too.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, start_http_server

from serving.outbox import Outbox
from shared.config import KafkaConfig
from shared.kafka import ensure_topics, free_port, producer
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage

TOPIC = KafkaConfig().interactions_topic


def record(
    conversation: str, text: str, at: datetime | None = None, answer: str = "ok", **fields: Any
) -> InteractionRecord:
    """A served chat of one user turn `text` (or `messages=`), answered `answer` at `at`."""
    at = at or datetime.now(UTC)
    return InteractionRecord(
        **{
            "conversation_id": conversation,
            "created_at": at,
            "served_at": at,
            "model_alias": "m",
            "adapter_version": None,
            "user_hash": "u",
            "messages": [{"role": "user", "content": text}],
            "response": [Choice(index=0, content=answer, finish_reason="stop")],
            "sampling": SamplingParams(),
            "usage": Usage(),
            "latency_ms": 1.0,
            "ttft_ms": None,
            "finish_reason": "stop",
            **fields,
        }
    )


def outbox_for(directory: Path, bootstrap: str, **options: Any) -> Outbox:
    """An outbox whose producer gives up quickly while no broker listens."""

    def connect():
        ensure_topics(KafkaConfig(bootstrap=bootstrap), timeout_s=2)
        return producer(
            bootstrap, max_block_ms=1000, request_timeout_ms=1000, delivery_timeout_ms=2000
        )

    return Outbox(directory, TOPIC, connect, **{"commit_delay_ms": 10, **options})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)


def memory_kb() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def limit_file_size(limit_bytes: int | None) -> None:
    """Writes past `limit_bytes` in any file fail with EFBIG (None lifts the limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit_bytes is None else limit_bytes, hard))


def segment_size(directory: Path) -> int:
    return max(directory.glob("segment-*.jsonl")).stat().st_size


def unserialisable(conversation: str) -> InteractionRecord:
    """A lone surrogate is valid JSON ("\\ud800") and pydantic keeps it in a raw field, but it
    cannot be encoded as UTF-8."""
    bad = record(conversation, "hi")
    bad.messages[0]["note"] = json.loads('"\\ud800"')
    return bad


# -- scenarios ------------------------------------------------------------------------------------
def disk_full(directory: str, bootstrap: str, queue_size: int) -> dict:
    """Records flow; the disk fills in the middle of a record's line; appends go on (the queue
    fills, then they are dropped); the disk takes writes again and everything queued flows."""
    directory = Path(directory)
    box = outbox_for(directory, bootstrap, max_queued_records=queue_size).start()
    ids = [f"disk-full-{i:03d}" for i in range(21 + 2 * queue_size)]
    for record_id in ids[:20]:
        box.append(record("disk-full", record_id, id=record_id))
    assert box.wait_drained(timeout_s=30), "the first records never reached Kafka"
    written = segment_size(directory)

    limit_file_size(written + written // 40)  # half the next line fits
    box.append(record("disk-full", ids[20], id=ids[20]))
    wait_until(lambda: "File too large" in (box.problem or ""), 10, "the write error reported")
    # The writer holds its failed batch and takes nothing more: the queue fills, then drops.
    slowest_append_s = 0.0
    for record_id in ids[21:]:
        started = time.perf_counter()
        box.append(record("disk-full", record_id, id=record_id))
        slowest_append_s = max(slowest_append_s, time.perf_counter() - started)
    during = {
        "problem": box.problem,
        "write_errors": sample("dynalign_outbox_write_errors_total"),
        "problem_gauge": sample("dynalign_outbox_problem"),
        "dropped": sample("dynalign_outbox_dropped_total", reason="queue_full"),
        "segment_size": segment_size(directory),
    }

    limit_file_size(None)  # space is free again
    wait_until(lambda: box.problem is None, 30, "Outbox.problem cleared once writes succeed")
    drained = box.wait_drained(timeout_s=30)
    box.close()
    return {
        "ids": ids,
        "during": during,
        "drained": drained,
        "slowest_append_s": slowest_append_s,
        "written_before": written,
        "problem_gauge_after": sample("dynalign_outbox_problem"),
    }


def close_on_full_disk(directory: str, bootstrap: str) -> dict:
    """close() while the disk refuses every write: it returns within its timeout and counts
    what it could not write; the segment holds no torn line."""
    directory = Path(directory)
    box = outbox_for(directory, bootstrap).start()
    box.append(record("close-full", "persisted", id="close-full-persisted"))
    assert box.wait_drained(timeout_s=30), "the first record never reached Kafka"
    limit_file_size(segment_size(directory) + 10)  # not even one more line fits
    ids = [f"close-full-{i}" for i in range(5)]
    for record_id in ids:
        box.append(record("close-full", record_id, id=record_id))
    wait_until(lambda: "File too large" in (box.problem or ""), 10, "the write error reported")
    started = time.monotonic()
    box.close(drain_timeout_s=1)
    close_s = time.monotonic() - started
    limit_file_size(None)
    lines = [
        json.loads(line)
        for path in sorted(directory.glob("segment-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]
    return {
        "close_s": close_s,
        "unwritten": ids,
        "dropped": sample("dynalign_outbox_dropped_total", reason="shutdown"),
        "segment_ids": [line["id"] for line in lines],
    }


def outage(directory: str, bootstrap: str, count: int, text_bytes: int) -> dict:
    """`count` records appended while no broker listens; memory measured around them. Appends
    are paced by the persisted count, as a server's request rate is far below the writer's."""
    box = outbox_for(Path(directory), bootstrap).start()
    template = record("outage", "x" * text_bytes)
    started = time.monotonic()

    def append(first: int, stop: int) -> None:
        for i in range(first, stop):
            box.append(template.model_copy(update={"id": f"outage-{i:06d}"}))
        wait_until(
            lambda: sample("dynalign_interactions_logged_total") >= stop,
            60,
            f"{stop} records persisted",
        )

    append(0, 1000)  # warm up: the threads, the producer's connection attempts, allocator pools
    baseline = memory_kb()["VmRSS"]
    for first in range(1000, count, 5000):
        append(first, min(first + 5000, count))
    memory = memory_kb()
    depth = box.depth
    box.close(drain_timeout_s=0)
    return {
        "baseline_kb": baseline,
        "rss_kb": memory["VmRSS"],
        "peak_kb": memory["VmHWM"],
        "depth": depth,
        "seconds": time.monotonic() - started,
        "dropped": sample("dynalign_outbox_dropped_total", reason="queue_full"),
    }


def drain(directory: str, bootstrap: str) -> dict:
    """Restart after the outage, with the broker back: everything on disk is forwarded."""
    baseline = memory_kb()["VmRSS"]
    started = time.monotonic()
    box = outbox_for(Path(directory), bootstrap)
    depth_at_start = box.depth
    box.start()
    drained = box.wait_drained(timeout_s=240)
    memory = memory_kb()
    box.close()
    return {
        "baseline_kb": baseline,
        "rss_kb": memory["VmRSS"],
        "peak_kb": memory["VmHWM"],
        "depth_at_start": depth_at_start,
        "drained": drained,
        "seconds": time.monotonic() - started,
    }


def alerting(directory: str, metrics_port: int) -> dict:
    """Export the outbox's metrics; on a line from stdin, dead-letter a record and make the disk
    refuse writes until the queue overflows; then serve until stdin closes."""
    start_http_server(metrics_port, addr="127.0.0.1")
    directory = Path(directory)
    no_broker = f"127.0.0.1:{free_port()}"  # none needed: every event here is the writer's
    box = outbox_for(directory, no_broker, max_queued_records=5).start()
    print("serving", flush=True)
    sys.stdin.readline()  # the test's Prometheus has scraped the counters at 0
    box.append(unserialisable("alerting"))
    box.append(record("alerting", "persisted"))
    wait_until(lambda: sample("dynalign_interactions_logged_total") >= 1, 10, "a record written")
    limit_file_size(segment_size(directory))
    for i in range(20):
        box.append(record("alerting", f"m{i}"))
    wait_until(lambda: "File too large" in (box.problem or ""), 10, "the write error reported")
    print("triggered", flush=True)
    sys.stdin.readline()
    return {}


SCENARIOS = {f.__name__: f for f in (disk_full, close_on_full_disk, outage, drain, alerting)}

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # A write past RLIMIT_FSIZE raises SIGXFSZ, whose default action kills the process; ignored,
    # the write fails with EFBIG instead, as a full disk fails it with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    result = SCENARIOS[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)
