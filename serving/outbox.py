"""The interaction outbox: a local append-only log forwarded to Kafka, so that logging never
fails or slows a chat response and nothing is lost while the broker is away. Users' ratings
(FeedbackRecord) take the same path to their own topic: one log, one durability.

    append() ─bounded queue─▶ writer ─(write + fsync, group commit)─▶ segment-000001.jsonl …
      ▲ on_disk() once fsynced: the server answers then
      └ full: dropped, counted ├─ unserialisable, oversized ─▶ dead-letter.jsonl     │
                               ├─ notify ─▶ forwarder ◀─ windows of ≤ 1000 records ──┘
                               │             ├─ acks=all, idempotent ─▶ dynalign.interactions
                               │             │                          (feedback: .feedback)
                               │             ├─ refused record, garbled line ─▶ dead-letter.jsonl
                               │             └─▶ acked.json (the cursor); trim segments behind it
                               └─ disk full: cut back, retried with back-off; Outbox.problem set

A record is forwarded only after it is on disk, and the on-disk cursor moves only over records
Kafka acknowledged (or that were set aside); on restart everything past the cursor is sent again
(at-least-once; records carry ids and consumers deduplicate). Segments wholly behind the cursor
are deleted, unless `retain`: then they are the log of an embedded broker that keeps nothing
itself, and `reseed()` gives such a broker, restarted empty, every record again (see there).
The forwarder reads from the segment files a window at a time, so memory stays bounded however
long Kafka is away.

A record that can never reach Kafka goes to `dead-letter.jsonl` in the outbox directory, one JSON
line each (reason, time, detail, the record), counted by dynalign_outbox_dead_lettered_total:
  unserialisable  the record cannot be encoded (e.g. a lone surrogate in a message field)
  oversized       larger than kafka.max_message_bytes. Set aside whole rather than truncated: a
                  truncated conversation is a different training example, and the operator can
                  still recover the original from the file
  rejected        the producer refused the record itself (MessageSizeTooLargeError, ...)
  garbled         a segment line that does not parse (disk damage, a torn write after a crash)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)
from kafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import BaseModel

from serving import metrics
from shared.config import KafkaConfig, ServingConfig
from shared.files import atomic_write, fsync_path, lock_directory
from shared.schemas import (
    SCHEMA_VERSION_HEADER,
    FeedbackRecord,
    InteractionRecord,
    rating_key,
    utc_now,
)

log = logging.getLogger(__name__)

OnDisk = Callable[[], None] | None
Record = InteractionRecord | FeedbackRecord
CURSOR_FILE = "acked.json"
DEAD_LETTER_FILE = "dead-letter.jsonl"
# What the writer takes per fsync and the forwarder reads and sends per round: bounds memory.
WINDOW_RECORDS = 1000
WINDOW_BYTES = 4 << 20  # a window holds at least one record, whatever its size
FLUSH_TIMEOUT_S = 30
# Errors that condemn the record itself. Every other error (broker away, authorisation,
# unsupported version) is the cluster's: retried with back-off, so that a misconfiguration
# never empties the outbox into the dead-letter file.
RECORD_ERRORS = (
    MessageSizeTooLargeError,
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
)


@dataclass(frozen=True)
class Reseeded:
    """What reseed() sent. `ends` are each partition's next offset after it; `expected` those
    the cursor recorded when the records were first acknowledged (None: an older cursor)."""

    records: int
    seconds: float
    ends: dict[str, int]  # "topic:partition" -> next offset at the cursor, vs `expected`
    expected: dict[str, int] | None
    garbled: int  # retained lines that no longer parse (damaged on disk since)

    @property
    def offsets_match(self) -> bool | None:
        return None if self.expected is None else self.ends == self.expected


@dataclass(frozen=True)
class _Entry:
    """A segment line as the forwarder sends it. `value` None: a garbled line, already
    dead-lettered, that only moves the cursor."""

    segment: int
    end_offset: int  # byte offset just past this line
    value: bytes | None = None
    topic: str = ""
    key: bytes = b""
    headers: tuple[tuple[str, bytes], ...] = ()


async def until_on_disk(on_disk: asyncio.Future, wait_ms: int) -> None:
    """Wait for append_on_disk()'s future before replying, so a reply the client has was never
    lost by a crash; a stalled disk delays it at most `wait_ms` (counted)."""
    try:
        await asyncio.wait_for(on_disk, wait_ms / 1000)
    except TimeoutError:
        metrics.OUTBOX_REPLIES_BEFORE_DISK.inc()


def _segment_path(directory: Path, seq: int) -> Path:
    return directory / f"segment-{seq:06d}.jsonl"


def _end_of_last_line(f: BinaryIO, size: int) -> int:
    """The offset just past the file's last newline (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 20))
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _key_and_headers(fields: dict[str, Any]):
    """The Kafka key and headers of a record, from its fields (a record recovered from disk
    may be of an older schema version than the current one): interactions are keyed by
    conversation, ratings by what they rate and who rates (FeedbackRecord.rating_key)."""
    if fields.get("kind") == "feedback":
        key = rating_key(fields["interaction_id"], fields["choice"], fields["rater_hash"])
    else:
        key = fields["conversation_id"]
    return key.encode(), (
        (SCHEMA_VERSION_HEADER, str(fields["schema_version"]).encode()),
        ("record-id", fields["id"].encode()),
    )


def _partition_name(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class Outbox:
    """`max_message_bytes`: larger records are dead-lettered (kafka.max_message_bytes; give the
    producer the same max_request_size). `max_queued_records`: records waiting for the writer
    before append() drops (serving.outbox_max_queued_records)."""

    def __init__(
        self,
        directory: Path,
        topic: str,
        producer_factory: Callable[[], KafkaProducer],
        feedback_topic: str | None = None,
        commit_delay_ms: int = 0,
        segment_bytes: int = 16 << 20,
        max_message_bytes: int = KafkaConfig.model_fields["max_message_bytes"].default,
        max_queued_records: int = ServingConfig.model_fields["outbox_max_queued_records"].default,
        retain: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self._lock = lock_directory(self.directory, "the outbox")  # released by close()
        self.topic = topic
        self.feedback_topic = feedback_topic
        self._producer_factory = producer_factory
        self._commit_delay_s = commit_delay_ms / 1000
        self._segment_bytes = segment_bytes
        self._max_message_bytes = max_message_bytes
        self._retain = retain

        # (record, on_disk) pairs; None wakes the writer at close().
        self._incoming: queue.Queue[tuple[Record, OnDisk] | None] = queue.Queue(max_queued_records)
        self._dropping = False  # between the first drop of a full queue and the next accept
        self._write_error: str | None = None  # the last write failure, until a write succeeds
        self._closing = threading.Event()  # close(): the writer empties the queue and ends
        self._abandon_writes = threading.Event()  # close() stopped waiting on a failing disk
        self._stopping = threading.Event()  # the forwarder ends
        self._dead_letter_lock = threading.Lock()
        # Guards what the writer and the forwarder share: the durable end and the record count.
        self._durable = threading.Condition()

        # Each "topic:partition"'s next offset as acknowledged, kept in the cursor (reseed()).
        self._partition_ends: dict[str, int] = {}
        self._read_pos = self._cursor = self._read_cursor()
        self._segment_seq, self._segment_size, self._unsettled = self._recover()
        self._segment_fd = self._open_segment(self._segment_seq)
        self._durable_end = (self._segment_seq, self._segment_size)
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._forwarder = threading.Thread(
            target=self._forward_loop, name="outbox-forwarder", daemon=True
        )
        metrics.OUTBOX_DEPTH.set_function(lambda: self.depth)
        metrics.OUTBOX_PROBLEM.set_function(lambda: self.problem is not None)

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> Outbox:
        self._writer.start()
        self._forwarder.start()
        return self

    def append(self, record: Record, on_disk: OnDisk = None) -> bool:
        """Never blocks and never raises: the writer thread serialises and persists the record,
        then calls `on_disk` (in its thread) once it is fsynced or set aside. While the queue is
        full (the disk refuses writes, or the writer cannot keep up) the record is dropped and
        counted (dynalign_outbox_dropped_total{reason="queue_full"}), and False returned."""
        try:
            self._incoming.put_nowait((record, on_disk))
        except queue.Full:
            metrics.OUTBOX_DROPPED.labels("queue_full").inc()
            if not self._dropping:
                self._dropping = True
                log.error(
                    "outbox: queue of %d records full (%s); dropping records until it drains",
                    self._incoming.maxsize,
                    self._write_error or "writer behind",
                )
            return False
        self._dropping = False
        return True

    def append_on_disk(self, record: Record) -> asyncio.Future | None:
        """append() from the event loop: a future done once the record is on disk (or set
        aside), None when it was dropped."""
        loop = asyncio.get_running_loop()
        on_disk = loop.create_future()

        def written() -> None:  # the writer's thread
            loop.call_soon_threadsafe(lambda: on_disk.done() or on_disk.set_result(None))

        return on_disk if self.append(record, written) else None

    @property
    def depth(self) -> int:
        """Records not yet acknowledged by Kafka (nor set aside): queued or on disk."""
        return self._unsettled + self._incoming.qsize()

    @property
    def problem(self) -> str | None:
        """Why records are being lost or put at risk now, or None: for the server's /health
        (503 while set) and the gauge dynalign_outbox_problem. Kafka being away is no problem
        here: records wait on disk (see `depth`)."""
        if self._write_error:
            return f"outbox cannot write to disk: {self._write_error}"
        if self._incoming.full():
            return "outbox queue full: new records are dropped"
        for thread in (self._writer, self._forwarder):
            if thread.ident is not None and not thread.is_alive() and not self._closing.is_set():
                return f"{thread.name} thread stopped"
        return None

    def wait_drained(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.depth and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.depth == 0

    def close(self, drain_timeout_s: float = 10.0) -> None:
        """Persist what was appended and give Kafka the rest of `drain_timeout_s` to take it
        (what it does not take stays on disk for the next start). Returns within about
        drain_timeout_s + 6 s whatever the threads are doing (the writer gets drain_timeout_s
        + 1 s); records the disk still refuses then are dropped and counted (reason
        "shutdown")."""
        deadline = time.monotonic() + drain_timeout_s
        self._closing.set()
        try:
            self._incoming.put_nowait(None)  # wakes an idle writer
        except queue.Full:
            pass  # a busy writer sees _closing once the queue is empty
        if self._writer.is_alive():
            self._writer.join(timeout=drain_timeout_s)
            self._abandon_writes.set()
            self._writer.join(timeout=1)
        if self._forwarder.is_alive():
            self.wait_drained(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        with self._durable:
            self._durable.notify_all()
        if self._forwarder.is_alive():
            self._forwarder.join(timeout=5)
        self._lock.close()  # releases the directory

    def reseed(self) -> Reseeded:
        """Send every retained record again, before start(), to a broker that lost them: the
        embedded one, whose storage is memory, after a restart. One producer sends them in the
        order they were first acknowledged, and a record's partition follows from its key, so
        every partition gets back the records it held in the order it held them: the same
        offsets, which the learner's checkpoints and consumer groups point at. Checked at the
        cursor against the partition ends it recorded; they differ if a retained line was
        damaged since, or the first broker held a record twice (a send retried by a new
        producer after a timeout). Records past the cursor (never acknowledged) follow, so the
        whole log is back before anyone reads it. Raises if the broker refuses: a retry could
        store a record twice, and a half-seeded log is worse than none.

        Kafka itself keeps its log; this is for a broker without storage, so that the outbox,
        which has every record on disk anyway, is the log's storage (`dynalign up`)."""
        started = time.monotonic()
        segments = self._segments()
        if segments and segments[0] > 1:
            log.warning(
                "outbox: segments before %d were deleted (an outbox that did not retain them); "
                "the re-seeded log starts later and its offsets differ",
                segments[0],
            )
        expected = dict(self._partition_ends) or None
        at_cursor: dict[str, int] | None = None
        ends: dict[str, int] = {}
        records = garbled = 0
        last: _Entry | None = None
        lines = self._lines((segments[0], 0), self._durable_end) if segments else iter(())
        producer = self._producer_factory()
        try:
            while window := self._reseed_window(lines):
                acked = [e for e in window if (e.segment, e.end_offset) <= self._cursor]
                for part, resend in ((acked, True), (window[len(acked) :], False)):
                    if not part:
                        continue
                    if not resend and at_cursor is None:
                        at_cursor = dict(ends)  # every acknowledged record is back
                    _, error = self._send(producer, part, ends, resend=resend)
                    if error is not None:
                        raise RuntimeError(f"outbox: re-seeding the broker failed: {error!r}")
                    records += sum(e.value is not None for e in part)
                    garbled += sum(e.value is None for e in part) if resend else 0
                last = window[-1]
        finally:
            producer.close(timeout=5)
        if last is not None:  # everything on disk is acknowledged now
            with self._durable:
                self._unsettled = 0
            self._partition_ends = ends
            self._save_cursor(last)
            self._read_pos = self._cursor
        metrics.OUTBOX_RESEEDED.inc(records)
        done = Reseeded(
            records, time.monotonic() - started, ends if at_cursor is None else at_cursor,
            expected, garbled,
        )  # fmt: skip
        if garbled:
            log.error("outbox: %d retained lines no longer parse; they are not in the log", garbled)
        if done.offsets_match is False:
            log.error(
                "outbox: re-seeded partition ends %s differ from those first acknowledged %s: "
                "offsets after the difference are shifted",
                done.ends,
                expected,
            )
        return done

    def _reseed_window(self, lines: Iterator[tuple]) -> list[_Entry]:
        """The next lines, bounded like the forwarder's windows. A garbled line behind the
        cursor is only counted by reseed(): it was dead-lettered when first read, or was
        damaged since; one past the cursor is read for the first time."""
        window: list[_Entry] = []
        size = 0
        for seq, end_offset, line in lines:
            first_read = (seq, end_offset) > self._cursor
            window.append(self._entry(seq, end_offset, line, dead_letter=first_read))
            size += len(line)
            if len(window) == WINDOW_RECORDS or size >= WINDOW_BYTES:
                break
        return window

    # -- start-up -------------------------------------------------------------------------------
    def _segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("segment-*.jsonl"))

    def _read_cursor(self) -> tuple[int, int]:
        """Where Kafka's acknowledgements reached. A damaged cursor means resending everything
        on disk: at-least-once, consumers deduplicate by record id."""
        path = self.directory / CURSOR_FILE
        try:
            data = json.loads(path.read_bytes())
            seq, offset = int(data["segment"]), int(data["offset"])
            ends = {
                # an older cursor named only the interactions topic's partitions
                p if ":" in p else _partition_name(self.topic, int(p)): int(o)
                for p, o in data.get("partitions", {}).items()
            }
        except FileNotFoundError:
            return 0, 0
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("outbox: %s unreadable (%r); resending from the oldest segment", path, exc)
            return 0, 0
        segment = _segment_path(self.directory, seq)
        size = segment.stat().st_size if segment.exists() else 0
        if not 0 <= offset <= size:
            log.warning(
                "outbox: %s points at byte %d of %s, which has %d; resending from the "
                "oldest segment",
                path,
                offset,
                segment.name,
                size,
            )
            return 0, 0
        self._partition_ends = ends
        if data.get("retain") and not self._retain:
            # A log kept for an embedded broker is never trimmed by a later run that would not
            # keep it (`up --ephemeral`, `--kafka`, `serve` on the same directory).
            log.info("outbox: %s holds a retained log: it stays retained", self.directory)
            self._retain = True
        return seq, offset

    def _recover(self) -> tuple[int, int, int]:
        """Delete segments behind the cursor (unless retained), cut a torn last line (a crash
        during a write) and count the records past the cursor, without holding them. Returns
        the tail segment, its size and the count."""
        cursor_seq, cursor_offset = self._cursor
        for seq in self._segments():
            if seq < cursor_seq and not self._retain:
                _segment_path(self.directory, seq).unlink()
        segments = self._segments()
        if not segments:
            return max(cursor_seq, 1), 0, 0
        tail = _segment_path(self.directory, segments[-1])
        with tail.open("r+b") as f:
            size = f.seek(0, os.SEEK_END)
            whole = _end_of_last_line(f, size)
            if whole < size:
                f.seek(whole)
                torn = f.read()
                f.truncate(whole)
                f.flush()
                os.fsync(f.fileno())
                self._dead_letter(
                    "garbled",
                    f"{tail.name}:{whole}: torn last line, cut (a crash interrupted its write)",
                    torn.decode("utf-8", "backslashreplace"),
                )
                size = whole
        count = 0
        for seq in (seq for seq in segments if seq >= cursor_seq):
            with _segment_path(self.directory, seq).open("rb") as f:
                f.seek(cursor_offset if seq == cursor_seq else 0)
                count += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        return segments[-1], size, count

    def _open_segment(self, seq: int) -> int:
        # Unbuffered, so that a failed write can be cut back exactly (see _write).
        return os.open(
            _segment_path(self.directory, seq), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )

    # -- dead letters ---------------------------------------------------------------------------
    def _dead_letter(self, reason: str, detail: str, record: Any) -> None:
        """Set a record aside in the dead-letter file, in a form that can always be written."""
        if isinstance(record, BaseModel):
            record_id = record.id
            record = record.model_dump(mode="python")  # no encoding yet: that may be the issue
        else:
            record_id = record.get("id") if isinstance(record, dict) else None
        entry = {"reason": reason, "at": utc_now().isoformat(), "detail": detail, "record": record}
        try:
            line = json.dumps(entry, ensure_ascii=True, default=str)
        except (TypeError, ValueError):  # e.g. a dict key JSON cannot hold: keep the text
            line = json.dumps({**entry, "record": repr(record)}, ensure_ascii=True)
        metrics.OUTBOX_DEAD_LETTERED.labels(reason).inc()
        log.error(
            "outbox: record %s dead-lettered (%s): %s; see %s",
            record_id,
            reason,
            detail,
            self.directory / DEAD_LETTER_FILE,
        )
        try:
            with self._dead_letter_lock, (self.directory / DEAD_LETTER_FILE).open("ab") as f:
                f.write(line.encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error(
                "outbox: could not write the dead letter, record %s is lost: %s", record_id, exc
            )

    # -- writer ---------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while not (self._closing.is_set() and self._incoming.empty()):
            batch = self._take_batch()
            written = [(record, line) for record, _ in batch if (line := self._serialise(record))]
            if written and not self._write([line for _, line in written]):
                break  # close() gave up on a disk that refuses writes
            for record, _ in written:
                logged = (
                    metrics.FEEDBACK_LOGGED
                    if isinstance(record, FeedbackRecord)
                    else metrics.INTERACTIONS_LOGGED
                )
                logged.inc()
            for _, on_disk in batch:
                if on_disk is not None:
                    on_disk()
        os.close(self._segment_fd)

    def _take_batch(self) -> list[tuple[Record, OnDisk]]:
        """The next record and whatever is queued behind it within the commit delay: one fsync
        for all. With no delay (the default) a lone record is fsynced at once, and the records
        that arrive during an fsync make the next batch, so batches grow with load by
        themselves (PostgreSQL's commit_delay = 0; a 10 ms delay added 8 ms, CI 2 … 15, to the
        median answer at concurrency 1, bench/results/serving-causes/two-cores.json)."""
        batch: list[tuple[Record, OnDisk]] = []
        deadline = None
        while len(batch) < WINDOW_RECORDS:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self._incoming.get(timeout=timeout)
            except queue.Empty:
                break
            if item is None:  # close() woke us
                break
            batch.append(item)
            deadline = deadline or time.monotonic() + self._commit_delay_s
        return batch

    def _serialise(self, record: Record) -> bytes | None:
        """The record's segment line, or None once it is dead-lettered."""
        try:
            value = record.model_dump_json().encode()
        except Exception as exc:  # any one record must not stop the writer
            self._dead_letter("unserialisable", repr(exc), record)
            return None
        key, headers = _key_and_headers(vars(record))
        # The producer's own estimate, so that nothing written here is refused for size there.
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
        if size > self._max_message_bytes:
            self._dead_letter(
                "oversized",
                f"{size} bytes as a Kafka message, over "
                f"kafka.max_message_bytes={self._max_message_bytes}",
                record,
            )
            return None
        return value + b"\n"

    def _write(self, lines: list[bytes]) -> bool:
        """Append and fsync, or leave the segment as it was: a failed write (disk full) is cut
        back, so no torn line stays, and tried again with back-off until it succeeds or close()
        gives up (then False). Meanwhile the queue fills and append() drops, counted."""
        data = b"".join(lines)
        backoff_s = 0.1
        while True:
            try:
                self._append_durably(data)
                break
            except OSError as exc:
                self._cut_back()
                if self._write_error is None:
                    log.error("outbox: cannot write %d records (%s); retrying", len(lines), exc)
                self._write_error = str(exc)
                metrics.OUTBOX_WRITE_ERRORS.inc()
                if self._abandon_writes.wait(backoff_s):
                    unwritten = len(lines)
                    while not self._incoming.empty():
                        unwritten += self._incoming.get_nowait() is not None  # None: wake-up
                    metrics.OUTBOX_DROPPED.labels("shutdown").inc(unwritten)
                    log.error("outbox: closing with %d records the disk refused", unwritten)
                    return False
                backoff_s = min(backoff_s * 2, 5.0)
        if self._write_error is not None:
            log.warning("outbox: writes succeed again")
            self._write_error = None
        with self._durable:
            self._durable_end = (self._segment_seq, self._segment_size)
            self._unsettled += len(lines)
            self._durable.notify()
        return True

    def _append_durably(self, data: bytes) -> None:
        if self._segment_size >= self._segment_bytes:
            self._roll_segment()
        view = memoryview(data)
        while view:  # os.write may write part (e.g. up to a size limit) before it fails
            view = view[os.write(self._segment_fd, view) :]
        os.fsync(self._segment_fd)
        self._segment_size += len(data)

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._segment_fd, self._segment_size)
        except OSError as exc:  # the forwarder will dead-letter the torn line as garbled
            log.error(
                "outbox: cannot cut a failed write back from segment %d: %s", self._segment_seq, exc
            )

    def _roll_segment(self) -> None:
        fd = self._open_segment(self._segment_seq + 1)
        try:
            fsync_path(self.directory)  # the new file's entry survives a crash
        except OSError:
            os.close(fd)
            raise
        os.close(self._segment_fd)
        self._segment_fd, self._segment_seq, self._segment_size = fd, self._segment_seq + 1, 0

    # -- forwarder ------------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        producer: KafkaProducer | None = None
        backoff_s = 0.1
        window: list[_Entry] = []  # kept across retries: read (and dead-lettered) once
        while not self._stopping.is_set():
            window = window or self._read_window()
            if not window:
                continue
            try:
                producer = producer or self._producer_factory()
                if self._stopping.is_set():
                    break  # close() stopped waiting while we connected: send nothing more
                settled, error = self._send(producer, window, self._partition_ends)
            except Exception as exc:  # no broker to connect to, metadata timeout
                settled, error = 0, exc
            self._advance(window[:settled])
            window = window[settled:]
            if error is None:
                backoff_s = 0.1
                continue
            # Broker away: nothing is lost, the rest waits and is sent again by a new producer.
            metrics.OUTBOX_PUBLISH_ERRORS.inc()
            log.warning("outbox: publish failed (%s); %d records wait", error, self.depth)
            if producer is not None:
                producer.close(timeout=0)
                producer = None
            self._stopping.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
        if producer is not None:
            producer.close(timeout=1)

    def _read_window(self) -> list[_Entry]:
        """The next records past those taken, read from the segment files up to the durable
        end: at most WINDOW_RECORDS records or about WINDOW_BYTES. Waits briefly for the writer
        when there is nothing new."""
        with self._durable:
            if self._read_pos == self._durable_end:
                self._durable.wait(timeout=0.5)
                return []
            durable_end = self._durable_end
        window: list[_Entry] = []
        size = 0
        for seq, end_offset, line in self._lines(self._read_pos, durable_end):
            window.append(self._entry(seq, end_offset, line))
            size += len(line)
            if len(window) == WINDOW_RECORDS or size >= WINDOW_BYTES:
                self._read_pos = (seq, end_offset)
                return window
        self._read_pos = durable_end
        return window

    def _lines(self, start: tuple[int, int], end: tuple[int, int]) -> Iterator[tuple]:
        """(segment, offset past the line, line) from `start` up to `end`. Segments before the
        last are complete; missing ones (behind an old cursor) are skipped."""
        seq, offset = start
        end_seq, end_offset = end
        while True:
            path = _segment_path(self.directory, seq)
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    for line in f:
                        if seq == end_seq and offset >= end_offset:
                            return
                        offset += len(line)
                        yield seq, offset, line
            if seq >= end_seq:
                return
            seq, offset = seq + 1, 0

    def _entry(self, seq: int, end_offset: int, line: bytes, dead_letter: bool = True) -> _Entry:
        # Topic, key, id and version come from the JSON, so forwarding needs nothing but the
        # segments.
        try:
            fields = json.loads(line)
            key, headers = _key_and_headers(fields)
            topic = self.topic if fields.get("kind") != "feedback" else self.feedback_topic
            if topic is None:
                raise ValueError("a rating, and this outbox has no feedback topic")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if not dead_letter:
                return _Entry(seq, end_offset)
            segment = _segment_path(self.directory, seq).name
            self._dead_letter(
                "garbled",
                f"{segment}:{end_offset - len(line)}: {exc!r}",
                line.decode("utf-8", "backslashreplace"),
            )
            return _Entry(seq, end_offset)
        return _Entry(seq, end_offset, line.rstrip(b"\n"), topic, key, headers)

    def _send(
        self,
        producer: KafkaProducer,
        window: list[_Entry],
        ends: dict[str, int],
        resend: bool = False,
    ) -> tuple[int, Exception | None]:
        """Send in order; return how many leading entries are settled (acknowledged, or set
        aside as refused) and the error that stopped the rest (they are sent again). Each
        acknowledgement moves its partition's next offset in `ends`. A resent record that is
        refused was dead-lettered the first time."""
        outcomes: list[Any] = []  # per entry: a future, an exception from send(), or None
        for entry in window:
            if entry.value is None:
                outcomes.append(None)
                continue
            try:
                outcomes.append(
                    producer.send(
                        entry.topic, key=entry.key, value=entry.value, headers=list(entry.headers)
                    )
                )
            except KafkaError as exc:  # refused before sending (size) or no metadata
                outcomes.append(exc)
                if not isinstance(exc, RECORD_ERRORS):
                    break
        try:
            producer.flush(timeout=FLUSH_TIMEOUT_S)
        except KafkaTimeoutError:
            pass  # the futures still pending fail below
        for settled, (entry, outcome) in enumerate(zip(window, outcomes, strict=True)):
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                if outcome is not None:
                    acked = outcome.get(timeout=0)
                    ends[_partition_name(acked.topic, acked.partition)] = acked.offset + 1
                    if not resend:
                        published = (
                            metrics.INTERACTIONS_PUBLISHED
                            if entry.topic == self.topic
                            else metrics.FEEDBACK_PUBLISHED
                        )
                        published.inc()
            except RECORD_ERRORS as exc:
                if not resend:
                    self._dead_letter("rejected", repr(exc), json.loads(entry.value))
            except Exception as exc:
                return settled, exc
        return len(outcomes), None

    def _save_cursor(self, last: _Entry) -> None:
        cursor = {
            "segment": last.segment,
            "offset": last.end_offset,
            "partitions": self._partition_ends,
            "retain": self._retain,
        }
        atomic_write(self.directory / CURSOR_FILE, json.dumps(cursor).encode())
        self._cursor = (last.segment, last.end_offset)

    def _advance(self, settled: list[_Entry]) -> None:
        """Move the cursor over settled entries; delete segments wholly behind it (unless
        retained)."""
        if not settled:
            return
        with self._durable:
            self._unsettled -= len(settled)
        last = settled[-1]
        try:
            self._save_cursor(last)
        except OSError as exc:  # a full disk: the old cursor stays, later records resend
            log.warning(
                "outbox: cannot save the cursor (%s); a restart resends from %s", exc, self._cursor
            )
            return
        if self._retain:
            return
        for seq in self._segments():
            if seq >= last.segment:
                break
            _segment_path(self.directory, seq).unlink()
