"""Records that cross process boundaries (Kafka topics, the outbox, the adapter store).

Every record carries `schema_version`; a producer also puts it in the Kafka header
`schema-version` so a consumer can route a record it cannot read to the dead-letter topic
without parsing the body.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INTERACTION_SCHEMA_VERSION = 2
FEEDBACK_SCHEMA_VERSION = 1
# Versions a consumer can read. v1 had no principal_hash: it reads as the user_hash.
READABLE_SCHEMA_VERSIONS = frozenset({1, 2})
SCHEMA_VERSION_HEADER = "schema-version"
# The HTTP header a chat request opts out of training with (serving/optout.py); every request
# dynalign itself sends (evaluation, datagen, judging) carries it.
OPT_OUT_HEADER = "x-dynalign-no-train"


def utc_now() -> datetime:
    return datetime.now(UTC)


class SamplingParams(BaseModel):
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Choice(BaseModel):
    index: int
    content: str
    finish_reason: str | None = None


class InteractionRecord(BaseModel):
    """One served chat completion, as the learner will replay it.

    `messages` are the request's messages as the client sent them (OpenAI chat format);
    `adapter_version` is None when the base model served the request.

    `principal_hash` pseudonymises who authenticated (the API key; "anonymous" without keys):
    the learner caps each principal's share of training by it, because the client chooses
    `user` freely. `user_hash` pseudonymises the principal and the `user` field together."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2] = INTERACTION_SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    conversation_id: str
    created_at: datetime
    served_at: datetime
    model_alias: str
    adapter_version: int | None
    user_hash: str
    principal_hash: str = ""
    messages: list[dict[str, Any]]
    response: list[Choice]
    sampling: SamplingParams
    usage: Usage
    latency_ms: float
    ttft_ms: float | None
    finish_reason: str | None

    @model_validator(mode="after")
    def _v1_principal(self) -> InteractionRecord:
        if not self.principal_hash:  # schema v1 records: the user was the only identity
            self.principal_hash = self.user_hash
        return self


class FeedbackRecord(BaseModel):
    """A rating of one answer (a choice of a logged interaction), on `dynalign.feedback`. A
    rater may rate again: the record's Kafka key is `rating_key` (interaction, choice, rater)
    and the topic is compacted, so the last rating per key is the rating, and a client's retry
    of the same rating changes nothing. Thumbs are stored on the same 1-5 scale (down = 1,
    up = 5), so one mean covers both; `thumbs` keeps what was said.

    `kind` tells the outbox, which holds interactions and feedback in one log, where it goes."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = FEEDBACK_SCHEMA_VERSION
    kind: Literal["feedback"] = "feedback"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    interaction_id: str
    choice: int = Field(0, ge=0)
    adapter_version: int | None  # of the rated answer; None = the base model
    rater_hash: str  # the rater's principal, pseudonymised like InteractionRecord's
    operator: str | None = None  # set when an operator rated someone else's answer
    rating: int = Field(ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    text: str | None = None
    tags: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utc_now)

    @property
    def rating_key(self) -> str:
        return rating_key(self.interaction_id, self.choice, self.rater_hash)

    @property
    def negative(self) -> bool:
        """Thumbs down, or 1-2 of 5."""
        return self.rating <= 2


def rating_key(interaction_id: str, choice: int, rater_hash: str) -> str:
    """A rating's Kafka key: one rating per rater and answer survives compaction."""
    return f"{interaction_id}/{choice}/{rater_hash}"
