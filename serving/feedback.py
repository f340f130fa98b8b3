"""Users' ratings of answers: `POST /v1/feedback`, bound to the key that was served the answer.

Every logged answer carries an interaction id (header `x-dynalign-interaction-id`) that says
who may rate it, without a lookup on any replica:

    <nonce>.<version>.<n>.<mac>      e.g. 5c1f...2c48.v3.1.0b6e...
    version  "v3", or "base"; n: the request's number of choices
    mac      HMAC(serving.user_hash_salt, the rest and the caller's principal)

so a rating names the version that answered and a valid choice, and an id handed to another
key (or made up) is refused. An opted-out answer gets no id: it cannot be rated for training.
Operators may rate any well-formed id; their rating carries their name.

A rating is a FeedbackRecord on the outbox, like an interaction: on disk before the reply,
then on `dynalign.feedback`. Rating again is allowed; the last rating per (interaction, choice,
rater) counts.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from serving import metrics
from serving.deps import Caller, ServerState
from serving.outbox import until_on_disk
from shared.schemas import FeedbackRecord

_INTERACTION_ID = re.compile(
    r"^(?P<nonce>[0-9a-f]{32})\.(?P<version>base|v[1-9][0-9]{0,8})\.(?P<n>[1-9][0-9]{0,3})"
    r"\.(?P<mac>[0-9a-f]{32})$"
)
THUMBS = {"down": 1, "up": 5}


# -- protocol ---------------------------------------------------------------------------------
class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interaction_id: Annotated[str, StringConstraints(max_length=128)]
    choice: int = Field(0, ge=0)  # for n > 1: which answer
    rating: Literal["up", "down"] | Annotated[StrictInt, Field(ge=1, le=5)]
    text: Annotated[str, StringConstraints(max_length=4000)] | None = None
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=16
    )


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    interaction_id: str
    choice: int
    rating: int  # 1-5 (thumbs: down 1, up 5)
    adapter_version: int | None


class FeedbackRefused(Exception):
    """The id is not one the caller may rate: `status` 400 (malformed, choice out of range) or
    403 (issued to another key, or not issued here)."""

    def __init__(self, status: int, message: str, param: str) -> None:
        super().__init__(message)
        self.status, self.param = status, param


# -- interaction ids --------------------------------------------------------------------------
def _mac(salt: bytes, body: str, principal: str) -> str:
    message = f"interaction\0{body}\0{principal}".encode()
    return hmac.new(salt, message, hashlib.sha256).hexdigest()[:32]


def issue_interaction_id(salt: bytes, principal: str, version: int | None, n: int) -> str:
    body = f"{secrets.token_hex(16)}.{'base' if version is None else f'v{version}'}.{n}"
    return f"{body}.{_mac(salt, body, principal)}"


def check_interaction_id(
    salt: bytes, caller: Caller, request: FeedbackRequest
) -> tuple[int | None, int]:
    """(adapter version, choices) of an id the caller may rate; raises FeedbackRefused."""
    match = _INTERACTION_ID.match(request.interaction_id)
    if match is None:
        raise FeedbackRefused(
            400,
            "interaction_id is not a dynalign interaction id: use the "
            "x-dynalign-interaction-id header of the answer",
            "interaction_id",
        )
    version, n = match["version"], int(match["n"])
    body = f"{match['nonce']}.{version}.{n}"
    if caller.operator is None and not hmac.compare_digest(
        match["mac"], _mac(salt, body, caller.principal)
    ):
        raise FeedbackRefused(
            403,
            "this interaction was not served to this API key: only the key that made the "
            "request, or an operator, may rate it",
            "interaction_id",
        )
    if request.choice >= n:
        raise FeedbackRefused(
            400, f"choice={request.choice}, but the answer had {n} choice(s)", "choice"
        )
    return (None if version == "base" else int(version[1:])), n


# -- recording --------------------------------------------------------------------------------
async def record_feedback(
    state: ServerState, caller: Caller, request: FeedbackRequest
) -> FeedbackResponse:
    """Check, log durably (the reply waits for the outbox's fsync, as a chat answer does),
    count."""
    version, _ = check_interaction_id(state.salt, caller, request)
    rating = THUMBS[request.rating] if isinstance(request.rating, str) else request.rating
    record = FeedbackRecord(
        interaction_id=request.interaction_id,
        choice=request.choice,
        adapter_version=version,
        rater_hash=state.pseudonym(caller.principal),
        operator=caller.operator,
        rating=rating,
        thumbs=request.rating if isinstance(request.rating, str) else None,
        text=request.text,
        tags=request.tags,
    )
    if state.outbox is not None:
        on_disk = state.outbox.append_on_disk(record)
        if on_disk is None:
            raise FeedbackRefused(503, "the feedback log is full; try again later", "")
        await until_on_disk(on_disk, state.cfg.serving.outbox_reply_wait_ms)
    metrics.FEEDBACK_RATING.labels("base" if version is None else str(version)).observe(rating)
    return FeedbackResponse(
        id=record.id,
        interaction_id=record.interaction_id,
        choice=record.choice,
        rating=rating,
        adapter_version=version,
    )
