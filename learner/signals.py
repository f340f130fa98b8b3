"""Users' signal per adapter version, read from the log: what users did after an answer
(implicit), and how they rated it (explicit, `dynalign.feedback`).

Implicit: each logged answer ends in one outcome, decided by the next record of its conversation
(the conversation id the server gives a record):

    regenerated  the same request was sent again: the user asked for another answer
    rephrased    the next user turn is a near-duplicate of the one answered (ROUGE-L F of the
                 two turns >= `rephrase_rouge_l`): the answer missed. Only near-duplication is
                 read; whether a turn is a complaint is not judged, so that no model's opinion
                 enters the users' signal
    continued    the conversation went on with another turn
    abandoned    no further turn within `abandon_after` of the answer

Time is the log's own (the newest `served_at` read), so replaying the log decides the same
outcomes. Open answers are bounded (`max_open`); past it the oldest is decided as abandoned.

Explicit: the last rating per (interaction, choice, rater) counts, as on the compacted topic; per
version the mean rating (1-5) and the share of negative ratings (thumbs down, 1-2).

While a canary runs, the job applies its rule (shared/canary.py) to the ratings given since it
started, for the canary and the live version it is compared with, and ends it through the
lifecycle (audited, actor "canary-rule") when the rule decides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from kafka import TopicPartition
from pydantic import ValidationError

from learner import metrics
from learner.drift import version_label
from shared.canary import Arm, Decision, decide
from shared.chat import NotText, content_text
from shared.config import KafkaConfig
from shared.kafka import consumer
from shared.lifecycle import Lifecycle
from shared.registry import RegistryError
from shared.rouge import rouge_l_f, rouge_tokens
from shared.schemas import FeedbackRecord, InteractionRecord

log = logging.getLogger(__name__)

Outcome = Literal["regenerated", "rephrased", "continued", "abandoned"]
OUTCOMES: tuple[Outcome, ...] = ("regenerated", "rephrased", "continued", "abandoned")


def fingerprint(messages: Iterable[dict[str, Any]]) -> str:
    """A conversation's turns as (role, text): what a client resends is compared by this, not by
    its JSON, which clients spell differently (content parts, extra null fields)."""
    turns = [(m.get("role"), content_text(m.get("content"))) for m in messages]
    return hashlib.sha256(json.dumps(turns).encode()).hexdigest()


@dataclass
class _OpenAnswer:
    record_id: str
    version: int | None
    served_at: datetime
    asked: str  # fingerprint of the request
    continued_as: frozenset[str]  # fingerprints of the request plus each choice's answer
    user_turn: list[str]  # the answered user turn's ROUGE tokens
    conversation: str


@dataclass(frozen=True)
class Decided:
    record_id: str
    version: int | None
    outcome: Outcome


class ImplicitSignals:
    """Feed interaction records in log order; each call returns the answers it decided."""

    def __init__(
        self,
        abandon_after: timedelta = timedelta(minutes=10),
        rephrase_rouge_l: float = 0.6,
        max_open: int = 100_000,
    ) -> None:
        self.abandon_after = abandon_after
        self.rephrase_rouge_l = rephrase_rouge_l
        self.max_open = max_open
        self._open: OrderedDict[str, _OpenAnswer] = OrderedDict()  # record id -> answer
        self._by_request: dict[tuple[str, str], str] = {}  # (conversation, asked) -> record id
        self._by_answer: dict[tuple[str, str], str] = {}  # (conversation, continued_as) -> id
        self._clock: datetime | None = None

    def observe(self, record: InteractionRecord) -> list[Decided]:
        try:
            asked = fingerprint(record.messages)
            follows = fingerprint(record.messages[:-1]) if record.messages else ""
            user_turn = content_text(record.messages[-1].get("content")) if record.messages else ""
        except NotText:
            return self._expire(record.served_at)
        conversation = record.conversation_id
        decided = []
        if (earlier := self._by_request.get((conversation, asked))) in self._open:
            decided.append(self._decide(earlier, "regenerated"))
        elif (earlier := self._by_answer.get((conversation, follows))) in self._open:
            answered = self._open[earlier].user_turn
            similar = rouge_l_f(answered, rouge_tokens(user_turn)) >= self.rephrase_rouge_l
            decided.append(self._decide(earlier, "rephrased" if similar else "continued"))
        answer = _OpenAnswer(
            record_id=record.id,
            version=record.adapter_version,
            served_at=record.served_at,
            asked=asked,
            continued_as=frozenset(
                fingerprint([*record.messages, {"role": "assistant", "content": c.content}])
                for c in record.response
            ),
            user_turn=rouge_tokens(user_turn),
            conversation=conversation,
        )
        self._open[record.id] = answer
        self._by_request[(conversation, asked)] = record.id
        for continued in answer.continued_as:
            self._by_answer[(conversation, continued)] = record.id
        return decided + self._expire(record.served_at)

    def _expire(self, served_at: datetime) -> list[Decided]:
        self._clock = max(self._clock or served_at, served_at)
        decided = []
        while self._open:
            oldest = next(iter(self._open.values()))
            if len(self._open) <= self.max_open and (
                oldest.served_at + self.abandon_after > self._clock
            ):
                break
            decided.append(self._decide(oldest.record_id, "abandoned"))
        return decided

    def _decide(self, record_id: str, outcome: Outcome) -> Decided:
        answer = self._open.pop(record_id)
        if self._by_request.get((answer.conversation, answer.asked)) == record_id:
            del self._by_request[(answer.conversation, answer.asked)]
        for continued in answer.continued_as:
            if self._by_answer.get((answer.conversation, continued)) == record_id:
                del self._by_answer[(answer.conversation, continued)]
        return Decided(record_id, answer.version, outcome)


@dataclass(frozen=True)
class VersionRatings:
    ratings: int
    mean: float
    negative_share: float


class ExplicitRatings:
    """The current rating per (interaction, choice, rater): a later record replaces an earlier."""

    def __init__(self) -> None:
        self._current: dict[str, FeedbackRecord] = {}

    def observe(self, record: FeedbackRecord) -> None:
        self._current[record.rating_key] = record

    def arm(self, version: int | None, since: datetime) -> Arm:
        rated = [
            r
            for r in self._current.values()
            if r.adapter_version == version and r.created_at >= since
        ]
        return Arm(len(rated), sum(r.negative for r in rated))

    def by_version(self) -> dict[int | None, VersionRatings]:
        grouped: dict[int | None, list[FeedbackRecord]] = {}
        for record in self._current.values():
            grouped.setdefault(record.adapter_version, []).append(record)
        return {
            version: VersionRatings(
                ratings=len(records),
                mean=sum(r.rating for r in records) / len(records),
                negative_share=sum(r.negative for r in records) / len(records),
            )
            for version, records in grouped.items()
        }


class SignalJob:
    """Reads both topics from their start (no consumer group: the signals are rebuilt from the
    log on every start, which the log's own clock makes repeatable), keeps ImplicitSignals and
    ExplicitRatings, and exports per version:
        dynalign_answer_outcomes_total{adapter_version, outcome}
        dynalign_user_rating_mean / dynalign_user_negative_share / dynalign_user_ratings"""

    def __init__(
        self,
        kafka: KafkaConfig,
        implicit: ImplicitSignals | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.implicit = implicit or ImplicitSignals()
        self.explicit = ExplicitRatings()
        self.outcomes: Counter[tuple[int | None, Outcome]] = Counter()
        self._topics = (kafka.interactions_topic, kafka.feedback_topic)
        self._feedback_topic = kafka.feedback_topic
        self._bootstrap = kafka.bootstrap
        self._consumer = None  # made on the first poll: the broker may not be up yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signals", daemon=True)

    def start(self) -> SignalJob:
        self._thread.start()
        return self

    def _assigned(self) -> bool:
        """Both topics' partitions, once all are known (assigned once, so positions stay)."""
        if self._consumer is None:
            self._consumer = consumer(self._bootstrap, group_id=None)
        if self._consumer.assignment():
            return True
        found = [(t, self._consumer.partitions_for_topic(t)) for t in self._topics]
        if not all(partitions for _, partitions in found):
            self._consumer.topics()  # asks the broker for metadata
            return False
        self._consumer.assign([TopicPartition(t, p) for t, ps in found for p in sorted(ps)])
        return True

    def poll(self, timeout_ms: int = 500) -> int:
        """Read what is there; returns the records read."""
        if not self._assigned():
            self._stop.wait(timeout_ms / 1000)
            return 0
        read = 0
        feedback_seen = False
        for batch in self._consumer.poll(timeout_ms=timeout_ms).values():
            for message in batch:
                read += 1
                try:
                    if message.topic == self._feedback_topic:
                        self.explicit.observe(FeedbackRecord.model_validate_json(message.value))
                        feedback_seen = True
                    else:
                        for d in self.implicit.observe(
                            InteractionRecord.model_validate_json(message.value)
                        ):
                            self.outcomes[(d.version, d.outcome)] += 1
                            metrics.ANSWER_OUTCOMES.labels(
                                version_label(d.version), d.outcome
                            ).inc()
                except ValidationError:
                    continue  # the learner's consumer dead-letters what cannot be read
        if feedback_seen:
            for version, ratings in self.explicit.by_version().items():
                label = version_label(version)
                metrics.USER_RATINGS.labels(label).set(ratings.ratings)
                metrics.USER_RATING_MEAN.labels(label).set(ratings.mean)
                metrics.USER_NEGATIVE_SHARE.labels(label).set(ratings.negative_share)
            if self.lifecycle is not None:
                self.judge_canary()
        return read

    def judge_canary(self) -> Decision | None:
        """Apply the canary rule to the ratings so far; end the canary if it decides."""
        canary = self.lifecycle.state().canary
        if canary is None:
            return None
        live = self.explicit.arm(canary.against, canary.started_at)
        tried = self.explicit.arm(canary.version, canary.started_at)
        decision, evidence = decide(
            live, tried, canary.min_ratings, canary.max_ratings, canary.margin
        )
        metrics.CANARY_NEGATIVE_DIFF.set(evidence.diff)
        if decision == "continue":
            return decision
        low, high = evidence.ci
        reason = (
            f"canary rule: {decision}; negative ratings {tried.negative}/{tried.ratings} "
            f"(v{canary.version}) vs {live.negative}/{live.ratings} (live), difference "
            f"{evidence.diff:+.3f} [{low:+.3f}, {high:+.3f}], margin {canary.margin:.2f}"
        )
        try:
            self.lifecycle.end_canary(
                decision, "canary-rule", reason, evidence.as_dict(), version=canary.version
            )
        except RegistryError as exc:  # an operator ended or replaced it meanwhile
            log.info("canary rule: %s", exc)
            return None
        log.info(reason)
        return decision

    def rates(self, version: int | None) -> dict[Outcome, float]:
        """Each outcome's share of the version's decided answers (empty before any)."""
        counts = {o: self.outcomes[(version, o)] for o in OUTCOMES}
        total = sum(counts.values())
        return {o: n / total for o, n in counts.items()} if total else {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a broker outage: the consumer reconnects on the next poll
                log.exception("signals: poll failed")
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._consumer is not None:
            self._consumer.close()
