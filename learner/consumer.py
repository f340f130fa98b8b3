"""Where training prompts come from: the interaction log (Kafka), or a static prompt file.

A training prompt is a conversation up to its last user turn (the user's own system prompt kept),
as text. No record can stop the learner: records that cannot be read go to the dead-letter topic
with a named reason; records that are readable but unfit for training are skipped and counted by
reason. Prompts over a principal's share of a batch are deferred to later batches, not dropped.
Offsets are committed only after the checkpoint that used them is on disk (see learner.loop); the
checkpoint also keeps the deferred prompts, which were read before those offsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kafka import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError

from learner import metrics
from shared.chat import NotText, content_text
from shared.config import DynalignConfig
from shared.files import read_jsonl
from shared.kafka import consumer, producer
from shared.schemas import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION_HEADER, InteractionRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPrompt:
    record_id: str
    principal_hash: str  # whose share of training this prompt counts against
    messages: list[dict[str, Any]]


@dataclass
class PromptBatch:
    prompts: list[TrainingPrompt]
    # Next offset to read per "topic:partition" once this batch is trained on (Kafka's commit
    # convention), and the prompts read before those offsets but deferred to a later batch:
    # together, where a source resumes.
    next_offsets: dict[str, int] = field(default_factory=dict)
    deferred: list[TrainingPrompt] = field(default_factory=list)


class PromptSource(Protocol):
    def next_batch(self, size: int, max_idle_polls: int | None = None) -> PromptBatch | None: ...
    def lag(self) -> int: ...
    def commit(self, next_offsets: dict[str, int]) -> None: ...
    def close(self) -> None: ...


# -- record → prompt ----------------------------------------------------------------------------
class Unreadable(Exception):
    """A record that is not an interaction record we can read: dead-lettered under `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unusable(Exception):
    """A readable record that cannot become a training prompt; `reason` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def training_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to and including its last user turn, as text (shared.chat)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise Unusable("no_user_turn")
    try:
        kept = [
            {"role": m.get("role"), "content": content_text(m.get("content"))}
            for m in messages[: last_user + 1]
        ]
    except NotText:
        raise Unusable("non_text_content") from None
    if not kept[-1]["content"].strip():
        raise Unusable("empty_prompt")
    return kept


class PromptFilter:
    """Which prompts the learner trains on: each must fit (`fits` raises Unusable otherwise; the
    learner renders it there as it will for rollout, judging and the loss), none may repeat among
    the last `remembered_keys` record ids and prompt hashes, and one principal may fill at most
    `max_user_share` of a batch."""

    def __init__(
        self, fits: Callable[[list[dict]], None], remembered_keys: int, max_user_share: float | None
    ) -> None:
        self.fits = fits
        self.remembered_keys = remembered_keys
        self.max_user_share = max_user_share
        self._seen: OrderedDict[str, None] = OrderedDict()

    def _remember(self, key: str) -> bool:
        """True if `key` is among the remembered ones."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > self.remembered_keys:
            self._seen.popitem(last=False)
        return False

    def check(self, prompt: TrainingPrompt) -> None:
        digest = hashlib.sha256(json.dumps(prompt.messages, sort_keys=True).encode()).hexdigest()
        duplicate_id = self._remember("id:" + prompt.record_id)
        if duplicate_id or self._remember("prompt:" + digest):
            raise Unusable("duplicate")
        self.fits(prompt.messages)

    def principal_cap(self, batch_size: int) -> int:
        if not self.max_user_share or self.max_user_share >= 1:
            return batch_size
        return max(1, math.floor(self.max_user_share * batch_size))


# -- Kafka --------------------------------------------------------------------------------------
def start_offset(partition: str, wanted: int, first: int, end: int) -> int:
    """Where reading a partition resumes, given the offset the checkpoint (or the group) holds
    and the records the topic holds now, [first, end). Never silently skips or repeats:
    - ahead of the end: the topic was recreated (an in-memory broker restarted, or deleted and
      made again), so every record in it is new to this learner: start at its beginning;
    - behind its start: retention deleted records before they were read: start at the first
      one still there, and count the lost ones as skipped ("expired_unread").
    An offset within [first, end] is used as it is."""
    if wanted > end:
        log.warning(
            "%s: checkpointed offset %d is past the topic's end %d; the topic was recreated, "
            "so all of its %d records are new: reading from %d",
            partition, wanted, end, end - first, first,
        )  # fmt: skip
        metrics.OFFSET_RESETS.labels("ahead_of_end").inc()
        return first
    if wanted < first:
        log.warning(
            "%s: checkpointed offset %d is before the topic's first record %d (retention "
            "deleted %d records before they were read): reading from %d",
            partition, wanted, first, first - wanted, first,
        )  # fmt: skip
        metrics.OFFSET_RESETS.labels("behind_start").inc()
        metrics.RECORDS_SKIPPED.labels("expired_unread").inc(first - wanted)
        return first
    return wanted


def _key(tp_or_message) -> str:
    return f"{tp_or_message.topic}:{tp_or_message.partition}"


def _partition(key: str) -> TopicPartition:
    topic, partition = key.rsplit(":", 1)
    return TopicPartition(topic, int(partition))


def _where(message) -> str:
    return f"{message.topic}:{message.partition}@{message.offset}"


class KafkaPromptSource:
    """Prompts from the interaction topic.

    The learner assigns itself every partition of the topic instead of subscribing as a group
    member: the checkpoint's offsets are the truth about what was trained on, so a rebalance has
    nothing to decide. Subscribed, a GRPO step longer than max_poll_interval_ms (minutes on a CPU)
    dropped the learner from its group, and the commit after the next checkpoint then failed
    (CommitFailedError). The group id still names where offsets are committed (consumer-lag
    tooling, and a start without a checkpoint resumes from them). One learner per group: two would
    both read every partition.
    """

    def __init__(
        self,
        cfg: DynalignConfig,
        prompt_filter: PromptFilter,
        start_offsets: dict[str, int] | None = None,
        deferred: list[TrainingPrompt] | None = None,
        poll_timeout_s: float = 1.0,
        span: tuple[dict[str, int], dict[str, int]] | None = None,
    ) -> None:
        """`span`: (begin, stop) offsets per "topic:partition" to replay; the source then reads
        only [begin, stop) and ends (next_batch returns None) once every partition is read."""
        self.cfg = cfg
        self.span = span
        self.topic = cfg.kafka.interactions_topic
        self.filter = prompt_filter
        self.poll_timeout_ms = int(poll_timeout_s * 1000)
        self.consumer = consumer(cfg.kafka.bootstrap, cfg.learner.consumer_group)
        self.dlq = producer(cfg.kafka.bootstrap)
        self.start_offsets = dict(start_offsets or {})
        self.deferred = list(deferred or [])  # read, not yet in a batch; oldest first
        self._next: dict[str, int] = {}
        self._pending: Iterator = iter(())
        self._waiting_on_share_cap = False
        metrics.WAITING_ON_SHARE_CAP.set(0)
        metrics.DEFERRED_PROMPTS.set(len(self.deferred))
        self._assign_new_partitions()

    def _assign_new_partitions(self) -> None:
        """Assign every partition of the topic, new ones too (partitions can be added). A
        partition starts at the checkpoint's offset; without one, at the group's committed offset
        or else the beginning; either is checked against what the topic holds (start_offset)."""
        if self.span:
            partitions = {_partition(key) for key in self.span[1]}
        else:
            partitions = {
                TopicPartition(self.topic, p)
                for p in self.consumer.partitions_for_topic(self.topic)
            }
        new = partitions - self.consumer.assignment()
        if not new:
            return
        self.consumer.assign(sorted(partitions))
        first = self.consumer.beginning_offsets(list(new))
        end = self.consumer.end_offsets(list(new))
        for tp in new:
            committed = self.span[0][_key(tp)] if self.span else self.consumer.committed(tp)
            wanted = self.start_offsets.get(_key(tp), committed)
            if wanted is not None:
                self.consumer.seek(tp, start_offset(_key(tp), wanted, first[tp], end[tp]))

    def _messages(self):
        while True:
            yield from self._pending
            self._assign_new_partitions()  # metadata is cached: no request unless it changed
            batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
            if not batches:
                yield None  # nothing new now: let the caller decide to wait or return
                continue
            stops = self.span[1] if self.span else {}
            self._pending = iter(
                [m for b in batches.values() for m in b if m.offset < stops.get(_key(m), math.inf)]
            )

    def _replayed(self) -> bool:
        """Every partition of the span read up to its stop."""
        return bool(self.span) and all(
            self.consumer.position(_partition(key)) >= stop for key, stop in self.span[1].items()
        )

    def next_batch(self, size: int, max_idle_polls: int | None = None) -> PromptBatch | None:
        """Block until `size` prompts make a batch within the per-principal share cap, oldest
        (deferred) first; None if `max_idle_polls` polls in a row bring nothing."""
        cap = self.filter.principal_cap(size)
        idle = 0
        messages = self._messages()
        while (batch := self._take(size, cap)) is None:
            message = next(messages)
            if message is None and self._replayed():
                return None  # the span is read; prompts short of a batch stay untrained
            if message is None:
                idle += 1
                if max_idle_polls is not None and idle >= max_idle_polls:
                    return None
                continue
            idle = 0
            self._next[_key(message)] = message.offset + 1
            if (prompt := self._read(message)) is not None:
                self._defer(prompt)
        return PromptBatch(batch, dict(self._next), list(self.deferred))

    def _take(self, size: int, cap: int) -> list[TrainingPrompt] | None:
        """The oldest deferred prompts, at most `cap` per principal, once `size` of them make a
        batch (taken out of `deferred`); None until then."""
        chosen: list[int] = []
        per_principal: Counter[str] = Counter()
        for i, prompt in enumerate(self.deferred):
            if per_principal[prompt.principal_hash] < cap:
                per_principal[prompt.principal_hash] += 1
                chosen.append(i)
                if len(chosen) == size:
                    break
        full = len(chosen) == size
        self._say_if_waiting_on_share_cap(
            not full and len(self.deferred) > len(chosen), size, cap, len(per_principal)
        )
        if not full:
            return None
        batch = [self.deferred[i] for i in chosen]
        taken = set(chosen)
        self.deferred = [p for i, p in enumerate(self.deferred) if i not in taken]
        metrics.DEFERRED_PROMPTS.set(len(self.deferred))
        return batch

    def _defer(self, prompt: TrainingPrompt) -> None:
        """Keep `prompt` for a batch. Past `max_deferred_prompts` the principal with the most
        deferred prompts loses its oldest (counted): a lone busy principal fills the list, but
        cannot crowd out the prompt from another principal that lets a batch form."""
        if len(self.deferred) >= self.cfg.learner.max_deferred_prompts:
            busiest, _ = Counter(p.principal_hash for p in self.deferred).most_common(1)[0]
            del self.deferred[
                next(i for i, p in enumerate(self.deferred) if p.principal_hash == busiest)
            ]
            metrics.RECORDS_SKIPPED.labels("deferred_overflow").inc()
        self.deferred.append(prompt)
        metrics.DEFERRED_PROMPTS.set(len(self.deferred))

    def _say_if_waiting_on_share_cap(
        self, waiting: bool, size: int, cap: int, principals: int
    ) -> None:
        """Log and export why no batch forms, once per change (not per poll)."""
        if waiting == self._waiting_on_share_cap:
            return
        self._waiting_on_share_cap = waiting
        metrics.WAITING_ON_SHARE_CAP.set(int(waiting))
        if waiting:
            log.warning(
                "waiting for prompts from more principals: a batch of %d prompts takes at most %d "
                "from one principal (max_user_share %s), and the %d deferred prompts come from %d "
                "principal(s); they wait (kept in checkpoints, at most %d) until others arrive",
                size,
                cap,
                self.filter.max_user_share,
                len(self.deferred),
                principals,
                self.cfg.learner.max_deferred_prompts,
            )
        else:
            log.info("the share cap no longer holds prompts back")

    def _read(self, message) -> TrainingPrompt | None:
        """The record's training prompt, or None: dead-lettered if unreadable, counted if unfit.
        Never raises: one record must not stop the learner."""
        metrics.RECORDS_CONSUMED.inc()
        try:
            return self._prompt(message)
        except Unreadable as exc:
            self._dead_letter(message, exc.reason)
        except Unusable as skip:
            metrics.RECORDS_SKIPPED.labels(skip.reason).inc()
        except Exception as exc:  # last resort: a case nobody foresaw is named, not fatal
            log.exception("unexpected error reading %s", _where(message))
            self._dead_letter(message, f"unexpected_error: {type(exc).__name__}: {exc}")
        return None

    def _prompt(self, message) -> TrainingPrompt:
        if message.value is None:
            raise Unreadable("null_value")
        if message.key is None:  # the outbox keys every record by its conversation
            raise Unreadable("null_key")
        version = dict(message.headers or []).get(SCHEMA_VERSION_HEADER) or b""
        version = version.decode(errors="replace")
        if version not in {str(v) for v in READABLE_SCHEMA_VERSIONS}:
            raise Unreadable(f"unsupported_schema_version:{version or 'missing'}")
        try:
            record = InteractionRecord.model_validate_json(message.value)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise Unreadable(f"invalid_record: {error['msg']} at {error['loc']}") from None
        prompt = TrainingPrompt(
            record.id, record.principal_hash, training_messages(record.messages)
        )
        self.filter.check(prompt)
        return prompt

    def _dead_letter(self, message, reason: str) -> None:
        """Keep the original bytes and say why; if even that fails, skip the record, counted."""
        log.warning("dead-letter %s: %s", _where(message), reason)
        try:
            self.dlq.send(
                self.cfg.kafka.dlq_topic,
                key=message.key,
                value=message.value,
                headers=[
                    ("reason", reason.encode(errors="backslashreplace")),
                    ("source", _where(message).encode()),
                    # kafka-python cannot send a null header value (the protocol can)
                    *((k, v) for k, v in message.headers or [] if v is not None),
                ],
            ).get(timeout=30)
        except Exception:  # the broker, or a record the producer refuses (too large, ...)
            log.exception("dead-letter send failed; skipping %s", _where(message))
            metrics.RECORDS_SKIPPED.labels("dead_letter_failed").inc()
        else:
            metrics.RECORDS_DEAD_LETTERED.inc()

    def commit(self, next_offsets: dict[str, int]) -> None:
        if not next_offsets:
            return
        self.consumer.commit(
            {
                _partition(key): OffsetAndMetadata(offset, "", -1)
                for key, offset in next_offsets.items()
            }
        )

    def lag(self) -> int:
        assigned = self.consumer.assignment()
        if not assigned:
            return 0
        ends = self.consumer.end_offsets(list(assigned))
        return sum(max(0, end - self.consumer.position(tp)) for tp, end in ends.items())

    def close(self) -> None:
        self.consumer.close()
        self.dlq.close()


# -- static prompt file (the paper's setting; bootstraps before traffic arrives) ------------------
class FilePromptSource:
    """JSONL with either {"messages": [...]} or {"prompt": "..."} per line; cycles forever.
    Its position is reported as the offset of a pseudo-partition "file:0", so checkpoints
    resume it like a Kafka source. Prompts that do not fit are skipped (logged, counted)."""

    def __init__(
        self, path: Path, prompt_filter: PromptFilter, start_offsets: dict[str, int] | None = None
    ) -> None:
        self.prompts = []
        for number, row in read_jsonl(path):
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            try:
                prompt = TrainingPrompt(
                    row.get("id", f"{path}:{number - 1}"), "file", training_messages(messages)
                )
                prompt_filter.fits(prompt.messages)
            except Unusable as skip:
                log.warning("%s line %d skipped: %s", path, number, skip.reason)
                metrics.RECORDS_SKIPPED.labels(skip.reason).inc()
                continue
            self.prompts.append(prompt)
        if not self.prompts:
            raise ValueError(f"{path}: no usable prompts")
        self._cursor = (start_offsets or {}).get("file:0", 0)

    def next_batch(self, size: int, max_idle_polls: int | None = None) -> PromptBatch:
        batch = [self.prompts[(self._cursor + i) % len(self.prompts)] for i in range(size)]
        self._cursor += size
        return PromptBatch(batch, {"file:0": self._cursor})

    def lag(self) -> int:
        return 0

    def commit(self, next_offsets: dict[str, int]) -> None:
        pass

    def close(self) -> None:
        pass
