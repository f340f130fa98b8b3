"""One chat request, from the caller to the engine and back into an interaction record:

    caller → limits → caps → alias (pin rules) → opt-out → vLLM OpenAIServingChat → response
           → InteractionRecord → outbox

Kept lean on the hot path: resolution is a dict lookup, logging is a queue put. HTTP concerns
(routes, status codes of refusals) live in serving/routes.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from typing import Any

from fastapi import Request

from serving import metrics
from serving.aliases import Route, UnknownModel
from serving.deps import Caller, ServerState
from serving.feedback import issue_interaction_id
from serving.limits import Permit
from serving.optout import parse_flag
from serving.outbox import until_on_disk
from shared.schemas import (
    OPT_OUT_HEADER,
    Choice,
    InteractionRecord,
    SamplingParams,
    Usage,
    utc_now,
)
from shared.vllm_compat import ChatCompletionRequest, ChatCompletionResponse, StreamOptions

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "x-dynalign-conversation-id"
VERSION_HEADER = "x-dynalign-adapter-version"
INTERACTION_HEADER = "x-dynalign-interaction-id"

# A client-given conversation id becomes a Kafka key and a line in the opt-out file.
_CONVERSATION_ID = re.compile(r"^[\x21-\x7e]{1,256}$")


class BadRequest(ValueError):
    """A request dynalign refuses before the engine sees it (400), naming the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# -- who, which conversation, may it be logged ----------------------------------------------------
def identities(
    state: ServerState, caller: Caller, request: ChatCompletionRequest
) -> tuple[str, str]:
    """(principal_hash, user_hash). `user` only subdivides a principal, so varying it never
    widens one client's share of training."""
    user = f"{caller.principal}\0{request.user}" if request.user else caller.principal
    return state.pseudonym(caller.principal), state.pseudonym(user)


def _metadata(request: ChatCompletionRequest) -> dict[str, Any]:
    metadata = (request.model_extra or {}).get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object", "metadata")
    return metadata


def conversation_ids(
    messages: list[dict[str, Any]],
    user_hash: str,
    raw_request: Request,
    request: ChatCompletionRequest,
) -> tuple[str, str]:
    """(the conversation id records carry, the derived one). Derived: later turns resend the
    same opening, so hashing the user and the first message groups a conversation's turns."""
    opening = json.dumps(messages[:1], sort_keys=True, default=str)
    derived = hashlib.sha256(f"{user_hash}\0{opening}".encode()).hexdigest()[:32]
    given = raw_request.headers.get(CONVERSATION_HEADER) or _metadata(request).get(
        "conversation_id"
    )
    if given is None or given == "":
        return derived, derived
    if not isinstance(given, str) or not _CONVERSATION_ID.match(given):
        raise BadRequest(
            "conversation id must be 1-256 printable ASCII characters without spaces",
            "metadata.conversation_id",
        )
    return given, derived


def wants_training(request: ChatCompletionRequest, raw_request: Request) -> bool:
    header = raw_request.headers.get(OPT_OUT_HEADER, "").strip()
    try:
        no_train = parse_flag(header, OPT_OUT_HEADER) if header else False
    except ValueError as exc:
        raise BadRequest(str(exc), OPT_OUT_HEADER) from exc
    metadata = _metadata(request)
    try:
        train = parse_flag(metadata["train"], "metadata.train") if "train" in metadata else True
    except ValueError as exc:
        raise BadRequest(str(exc), "metadata.train") from exc
    return train and not no_train


def check_unicode(body: Any) -> None:
    """JSON may escape a lone surrogate ("\\ud800"); Python keeps it, but it is no text: the
    engine's message encoder fails on it (a 500 from vLLM itself). Refuse it as the client's
    error instead, naming where it is."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"The request is not valid Unicode text: {exc.reason} "
            f"({exc.object[exc.start : exc.end]!r})",
            "messages",
        ) from None


def check_caps(state: ServerState, n: int | None, max_tokens: int | None, priority: int) -> None:
    caps = state.cfg.serving
    if priority < 0:  # lower runs first: below 0 a client would jump every other user
        raise BadRequest(f"priority={priority}: a client's priority is 0 or more", "priority")
    if (n or 1) > caps.max_n:
        raise BadRequest(f"n={n} exceeds this server's limit of {caps.max_n}", "n")
    if max_tokens is not None and max_tokens > caps.max_tokens:
        raise BadRequest(
            f"max_tokens={max_tokens} exceeds this server's limit of {caps.max_tokens}",
            "max_tokens",
        )


# -- which weights answer -------------------------------------------------------------------------
async def resolve(state: ServerState, model: str, caller: Caller, user: str = "") -> Route:
    """Alias → route (`user`, a pseudonym, for a canary split). A pinned version is loaded on
    first use; chat keys may pin what users were served (live, retired), operators also
    candidates and rejected versions."""
    try:
        route = state.aliases.resolve(model, user)
        version = route.adapter_version if model != state.aliases.served_name else None
    except UnknownModel:
        version = state.aliases.pinned_version(model)
        if version is None or version not in state.registry.versions():
            raise
        route = None
    if version is not None and caller.operator is None:
        status = state.follower.registry_state.states.get(version, "candidate")
        if status not in ("live", "canary", "retired"):
            raise PermissionError(
                f"v{version} is {status}: only versions that were live can be "
                "pinned with a chat key; operators can pin it"
            )
    if route is None:
        await state.follower.ensure_loaded(version)
        route = state.aliases.resolve(model, user)
    if route.adapter_version is not None:
        state.follower.in_flight[route.adapter_version] += 1
    return route


# -- the interaction being served ------------------------------------------------------------------
@dataclass
class Interaction:
    """What we know about one request while it is served; becomes an InteractionRecord."""

    state: ServerState
    route: Route
    permit: Permit
    request: ChatCompletionRequest
    messages: list[dict[str, Any]]
    principal: str
    user: str
    conversation: str
    log_for_training: bool
    record_id: str | None = None  # the interaction id the client gets, when logged
    started: float = field(default_factory=time.perf_counter)
    created_at: Any = field(default_factory=utc_now)
    ttft_s: float | None = None
    released: bool = False
    on_disk: asyncio.Future | None = None  # set once the logged record is fsynced

    def release(self) -> None:
        """The client's slot is free, and the adapter version may be evicted once no request
        uses it."""
        self.permit.release()
        if not self.released and self.route.adapter_version is not None:
            self.state.follower.in_flight[self.route.adapter_version] -= 1
        self.released = True

    @property
    def version_label(self) -> str:
        v = self.route.adapter_version
        return "base" if v is None else str(v)

    def finish(self, status: int, choices: list[Choice], usage: Usage | None) -> str | None:
        """Count the request; log it for training; return the record id (None if not logged)."""
        self.release()
        latency_s = time.perf_counter() - self.started
        labels = (self.route.alias, self.version_label)
        metrics.REQUESTS.labels(*labels, str(status)).inc()
        metrics.REQUEST_LATENCY.labels(*labels).observe(latency_s)
        if self.ttft_s is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(*labels).observe(self.ttft_s)
        if usage:
            metrics.TOKENS.labels("prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels("completion").inc(usage.completion_tokens)
            metrics.COMPLETION_TOKENS.labels(self.version_label).observe(usage.completion_tokens)
        if not self.log_for_training or self.state.outbox is None:
            return None
        req = self.request
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        record = InteractionRecord(
            id=self.record_id,
            conversation_id=self.conversation,
            created_at=self.created_at,
            served_at=self.created_at + timedelta(seconds=latency_s),
            model_alias=self.route.alias,
            adapter_version=self.route.adapter_version,
            user_hash=self.user,
            principal_hash=self.principal,
            messages=self.messages,
            response=choices,
            sampling=SamplingParams(
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.max_completion_tokens or req.max_tokens,
                n=req.n or 1,
                seed=req.seed,
                stop=stop,
            ),
            usage=usage or Usage(),
            latency_ms=latency_s * 1000,
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1000,
            finish_reason=choices[0].finish_reason if choices else None,
        )
        self.on_disk = self.state.outbox.append_on_disk(record)
        return record.id

    async def logged(self) -> None:
        """Wait until the logged record is on the outbox's disk, so an answer the client has
        was never lost by a crash; a stalled disk delays it at most outbox_reply_wait_ms."""
        if self.on_disk is not None:
            await until_on_disk(self.on_disk, self.state.cfg.serving.outbox_reply_wait_ms)


async def start_interaction(
    state: ServerState, caller: Caller, request: ChatCompletionRequest, raw_request: Request
) -> Interaction:
    """Everything dynalign decides before the engine runs. Raises BadRequest, PermissionError,
    UnknownModel, AdapterRefused or LimitExceeded; holds nothing when it raises."""
    check_caps(
        state, request.n, request.max_completion_tokens or request.max_tokens, request.priority
    )
    train = wants_training(request, raw_request)
    body = await raw_request.json()  # already parsed and cached by FastAPI
    check_unicode(body)
    messages = body["messages"]
    principal, user = identities(state, caller, request)
    conversation, derived = conversation_ids(messages, user, raw_request, request)
    if not train:
        state.opt_outs.add(conversation, derived)
        metrics.INTERACTIONS_OPTED_OUT.inc()
    elif conversation in state.opt_outs or derived in state.opt_outs:
        train = False  # an earlier turn opted out; this turn carries it in its history
        metrics.INTERACTIONS_OPTED_OUT.inc()
    permit, route = await admit(state, caller, request.model, user)
    logged = train and state.outbox is not None
    return Interaction(
        state=state,
        route=route,
        permit=permit,
        request=request,
        messages=messages,
        principal=principal,
        user=user,
        conversation=conversation,
        log_for_training=train,
        record_id=issue_interaction_id(
            state.salt, caller.principal, route.adapter_version, request.n or 1
        )
        if logged
        else None,
    )


async def admit(
    state: ServerState, caller: Caller, model: str, user: str = ""
) -> tuple[Permit, Route]:
    """The client's slot, then the route; nothing held if either is refused."""
    permit = state.limits.admit(caller.principal)
    try:
        return permit, await resolve(state, model, caller, user)
    except BaseException:
        permit.release()
        raise


async def serve_chat(interaction: Interaction, raw_request: Request):
    """Run the request on vLLM's own chat layer. Returns (ErrorResponse | response | stream,
    headers); the interaction is finished (or finishes with the stream)."""
    request = interaction.request
    client_wants_usage = bool(request.stream_options and request.stream_options.include_usage)
    if request.stream:
        options = request.stream_options or StreamOptions()
        request.stream_options = options.model_copy(update={"include_usage": True})
    request.model = interaction.route.engine_model
    headers = {VERSION_HEADER: interaction.version_label}
    if interaction.record_id:  # also on a stream, whose headers go before its record exists
        headers[INTERACTION_HEADER] = interaction.record_id
    try:
        result = await raw_request.app.state.openai_serving_chat.create_chat_completion(
            request, raw_request
        )
    except BaseException:  # cancelled by a disconnect, or an engine error
        interaction.release()
        raise
    if isinstance(result, ChatCompletionResponse):
        choices = [
            Choice(index=c.index, content=c.message.content or "", finish_reason=c.finish_reason)
            for c in result.choices
        ]
        usage = Usage(
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens or 0,
            total_tokens=result.usage.total_tokens,
        )
        interaction.finish(HTTPStatus.OK, choices, usage)
        await interaction.logged()
        return result, headers
    if hasattr(result, "error"):  # vLLM's ErrorResponse
        interaction.log_for_training = False
        interaction.finish(result.error.code, [], None)
        headers.pop(INTERACTION_HEADER, None)
        return result, headers
    return logged_stream(interaction, result, client_wants_usage), headers


async def serve_completion(state: ServerState, caller: Caller, request, raw_request: Request):
    """/v1/completions through the same limits, caps and aliases as chat, on vLLM's own
    completion layer. Never logged: the loop replays chat turns under the CA system prompt, and a
    raw completion prompt has no user turn to replay (it is text to continue, not a request)."""
    check_caps(state, request.n, request.max_tokens, request.priority)
    check_unicode(await raw_request.json())
    permit, route = await admit(state, caller, request.model)
    interaction = Interaction(
        state=state,
        route=route,
        permit=permit,
        request=request,
        messages=[],
        principal="",
        user="",
        conversation="",
        log_for_training=False,
    )
    request.model = route.engine_model
    headers = {VERSION_HEADER: interaction.version_label}
    try:
        result = await raw_request.app.state.openai_serving_completion.create_completion(
            request, raw_request
        )
    except BaseException:
        interaction.release()
        raise
    if hasattr(result, "error"):
        interaction.finish(result.error.code, [], None)
        return result, headers
    if hasattr(result, "choices"):
        interaction.finish(HTTPStatus.OK, [], None)
        return result, headers
    return logged_stream(interaction, result, client_wants_usage=True), headers


async def logged_stream(
    interaction: Interaction, chunks: AsyncIterator[str], client_wants_usage: bool
) -> AsyncIterator[str]:
    """Pass vLLM's SSE chunks through unchanged while collecting text, finish reasons and usage.
    We always ask vLLM for usage (the record needs it) and drop that last chunk when the client
    did not ask for it."""
    try:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage: Usage | None = None
        failed = False
        done = None  # vLLM's last chunk: sent once the record is on disk
        async for chunk in chunks:
            if chunk.startswith("data: [DONE]"):
                done = chunk
                continue
            if chunk.startswith("data: {"):
                payload = json.loads(chunk[6:])
                if "error" in payload:
                    failed = True
                if payload.get("usage"):
                    usage = Usage(**{k: payload["usage"][k] for k in Usage.model_fields})
                for choice in payload.get("choices", ()):
                    # chat chunks carry delta.content; completion chunks carry text
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        if interaction.ttft_s is None:
                            interaction.ttft_s = time.perf_counter() - interaction.started
                        texts.setdefault(choice["index"], []).append(text)
                    if choice.get("finish_reason"):
                        finish[choice["index"]] = choice["finish_reason"]
                if not client_wants_usage and not payload.get("choices") and payload.get("usage"):
                    continue
            yield chunk
        if failed:
            interaction.log_for_training = False
            interaction.finish(HTTPStatus.INTERNAL_SERVER_ERROR, [], usage)
        else:
            indices = sorted(set(texts) | set(finish))
            choices = [
                Choice(index=i, content="".join(texts.get(i, [])), finish_reason=finish.get(i))
                for i in indices
            ]
            interaction.finish(HTTPStatus.OK, choices, usage)
            await interaction.logged()
        if done is not None:
            yield done
    finally:  # also when the client disconnects mid-stream (the generator is closed)
        interaction.release()
