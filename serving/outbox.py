"""The interaction outbox: a local append-only log forwarded to Kafka, so that logging never
fails or slows a chat response and nothing is lost while the broker is away.

    append() ──queue──▶ writer thread ──(write + fsync in batches)──▶ segment-000001.jsonl
                                      └──▶ forwarder thread ──acks=all──▶ dynalign.interactions
                                                           └──▶ acked.json (cursor) ; trim segments

A record is forwarded only after it is on disk, and the on-disk cursor moves only over records
Kafka acknowledged; on restart everything past the cursor is sent again (at-least-once; records
carry ids and consumers deduplicate). Segments wholly behind the cursor are deleted.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kafka import KafkaProducer

from serving import metrics
from shared.files import fsync_path
from shared.schemas import INTERACTION_SCHEMA_VERSION, SCHEMA_VERSION_HEADER, InteractionRecord

log = logging.getLogger(__name__)

CURSOR_FILE = "acked.json"


@dataclass(frozen=True)
class _Pending:
    segment: int
    end_offset: int  # byte offset just past this record's line
    key: bytes
    value: bytes
    record_id: bytes


def _segment_path(directory: Path, seq: int) -> Path:
    return directory / f"segment-{seq:06d}.jsonl"


class Outbox:
    def __init__(
        self,
        directory: Path,
        topic: str,
        producer_factory: Callable[[], KafkaProducer],
        fsync_interval_ms: int = 50,
        segment_bytes: int = 16 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.topic = topic
        self._producer_factory = producer_factory
        self._fsync_interval_s = fsync_interval_ms / 1000
        self._segment_bytes = segment_bytes

        self._incoming: queue.SimpleQueue[InteractionRecord | None] = queue.SimpleQueue()
        self._pending: deque[_Pending] = deque()  # durable, not yet acknowledged, in order
        self._pending_ready = threading.Condition()
        self._stopping = threading.Event()
        self._writer_done = threading.Event()
        self._cursor = self._read_cursor()
        self._recover()
        self._segment_seq, self._segment = self._open_tail_segment()
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._forwarder = threading.Thread(
            target=self._forward_loop, name="outbox-forwarder", daemon=True
        )
        metrics.OUTBOX_DEPTH.set_function(lambda: self.depth)

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> "Outbox":
        self._writer.start()
        self._forwarder.start()
        return self

    def append(self, record: InteractionRecord) -> None:
        """Never blocks on disk or network: the writer thread serialises and persists."""
        self._incoming.put(record)

    @property
    def problem(self) -> str | None:
        """Why records cannot be persisted now (None: they can)."""
        return None

    @property
    def depth(self) -> int:
        return len(self._pending) + self._incoming.qsize()

    def wait_drained(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.depth and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.depth == 0

    def close(self, drain_timeout_s: float = 10.0) -> None:
        """Persist everything appended; give Kafka `drain_timeout_s` to take the rest (what it
        does not take stays on disk and is sent on the next start)."""
        self._incoming.put(None)
        self._writer_done.wait()
        self.wait_drained(drain_timeout_s)
        self._stopping.set()
        with self._pending_ready:
            self._pending_ready.notify_all()
        self._forwarder.join(timeout=15)

    # -- start-up -------------------------------------------------------------------------------
    def _read_cursor(self) -> tuple[int, int]:
        try:
            data = json.loads((self.directory / CURSOR_FILE).read_text())
            return int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return 0, 0

    def _segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("segment-*.jsonl"))

    def _recover(self) -> None:
        """Queue every durable record past the cursor; cut a torn last line from a crash."""
        cursor_seg, cursor_off = self._cursor
        for seq in self._segments():
            if seq < cursor_seg:
                _segment_path(self.directory, seq).unlink()
                continue
            path = _segment_path(self.directory, seq)
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
                with path.open("r+b") as f:
                    f.truncate(len(data))
            offset = cursor_off if seq == cursor_seg else 0
            for line in data[offset:].splitlines(keepends=True):
                offset += len(line)
                self._pending.append(self._pending_entry(seq, offset, line.rstrip(b"\n")))

    def _open_tail_segment(self):
        seq = max(self._segments(), default=max(self._cursor[0], 1))
        return seq, _segment_path(self.directory, seq).open("ab")

    @staticmethod
    def _pending_entry(seq: int, end_offset: int, value: bytes) -> _Pending:
        # Key and id are read back from the JSON so recovery needs nothing but the segment files.
        head = json.loads(value)
        return _Pending(seq, end_offset, head["conversation_id"].encode(), value,
                        head["id"].encode())

    # -- writer ---------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        closing = False
        while not closing:
            batch: list[InteractionRecord] = []
            item = self._incoming.get()
            deadline = time.monotonic() + self._fsync_interval_s
            # Group whatever arrives within one fsync interval into a single fsync.
            while True:
                if item is None:
                    closing = True
                    break
                batch.append(item)
                try:
                    item = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._persist(batch)
        self._segment.close()
        self._writer_done.set()

    def _persist(self, batch: list[InteractionRecord]) -> None:
        entries = []
        for record in batch:
            value = record.model_dump_json().encode()
            self._segment.write(value + b"\n")
            entries.append(_Pending(self._segment_seq, self._segment.tell(),
                                    record.conversation_id.encode(), value, record.id.encode()))
        self._segment.flush()
        os.fsync(self._segment.fileno())
        metrics.INTERACTIONS_LOGGED.inc(len(batch))
        with self._pending_ready:
            self._pending.extend(entries)
            self._pending_ready.notify()
        if self._segment.tell() >= self._segment_bytes:
            self._segment.close()
            self._segment_seq += 1
            self._segment = _segment_path(self.directory, self._segment_seq).open("ab")
            fsync_path(self.directory)

    # -- forwarder ------------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        producer: KafkaProducer | None = None
        backoff_s = 0.1
        while not self._stopping.is_set():
            with self._pending_ready:
                if not self._pending:
                    self._pending_ready.wait(timeout=0.5)
                    continue
                window = list(itertools.islice(self._pending, 1000))
            error: Exception | None = None
            try:
                producer = producer or self._producer_factory()
                acked, error = self._send(producer, window)
                self._advance(acked)
            except Exception as exc:  # no broker to connect to, metadata timeout
                error = exc
            if error is None:
                backoff_s = 0.1
                continue
            # Broker away or a record refused: nothing is lost, the rest waits and is re-sent.
            metrics.OUTBOX_PUBLISH_ERRORS.inc()
            log.warning("outbox: publish failed (%s); %d records wait", error, self.depth)
            if producer is not None:
                producer.close(timeout=0)
                producer = None
            self._stopping.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
        if producer is not None:
            producer.close(timeout=5)

    def _send(self, producer: KafkaProducer, window: list[_Pending]) -> tuple[int, Exception | None]:
        """Send in order; return how many leading records Kafka acknowledged, and the first
        delivery error (the records from there on are sent again)."""
        headers = [(SCHEMA_VERSION_HEADER, str(INTERACTION_SCHEMA_VERSION).encode())]
        futures = [
            producer.send(self.topic, key=p.key, value=p.value,
                          headers=headers + [("record-id", p.record_id)])
            for p in window
        ]
        producer.flush(timeout=30)
        for acked, future in enumerate(futures):
            try:
                future.get(timeout=0)
            except Exception as exc:
                return acked, exc
        return len(futures), None

    def _advance(self, count: int) -> None:
        if not count:
            return
        with self._pending_ready:
            done = [self._pending.popleft() for _ in range(count)]
        metrics.INTERACTIONS_PUBLISHED.inc(count)
        last = done[-1]
        self._cursor = (last.segment, last.end_offset)
        tmp = self.directory / (CURSOR_FILE + ".tmp")
        tmp.write_text(json.dumps({"segment": last.segment, "offset": last.end_offset}))
        os.replace(tmp, self.directory / CURSOR_FILE)
        for seq in self._segments():
            if seq < last.segment:
                _segment_path(self.directory, seq).unlink()
