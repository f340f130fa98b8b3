"""The OpenAI-compatible chat server: vLLM's protocol layer and engine, plus what dynalign adds —
model aliases over adapter versions, API keys, training opt-out, and the interaction log.

Request path (kept lean: resolution is a dict lookup, logging is a queue put):
    auth → alias → vLLM OpenAIServingChat → response → InteractionRecord → outbox
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelList
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from serving import metrics
from serving.admin import router as admin_router
from serving.adapters import AdapterFollower, AdapterRefused
from serving.aliases import AliasTable, Route, UnknownModel
from serving.engine import parse_vllm_args, serving_state, vllm_cli_args
from serving.outbox import Outbox
from shared.config import DynalignConfig
from shared.registry import Registry, base_fingerprint
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage, utc_now

log = logging.getLogger(__name__)

OPT_OUT_HEADER = "x-dynalign-no-train"
CONVERSATION_HEADER = "x-dynalign-conversation-id"
VERSION_HEADER = "x-dynalign-adapter-version"
INTERACTION_HEADER = "x-dynalign-interaction-id"

router = APIRouter()


@dataclass
class ServerState:
    cfg: DynalignConfig
    aliases: AliasTable
    outbox: Outbox | None
    registry: Registry
    api_keys: frozenset[str] = field(default_factory=frozenset)
    operator_tokens: frozenset[str] = field(default_factory=frozenset)
    follower: AdapterFollower | None = None  # set once the engine is up


def _state(request: Request) -> ServerState:
    return request.app.state.dynalign


def error_json(status: HTTPStatus, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": status.phrase, "param": param,
                      "code": status.value}}
    return JSONResponse(body, status_code=status.value)


# -- auth, identity, opt-out ---------------------------------------------------------------------
def bearer_key(raw_request: Request) -> str | None:
    auth = raw_request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


async def require_api_key(raw_request: Request) -> None:
    keys = _state(raw_request).api_keys
    if keys and bearer_key(raw_request) not in keys:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "Invalid or missing API key.")


def pseudonym(state: ServerState, identity: str) -> str:
    salt = state.cfg.serving.user_hash_salt.get_secret_value().encode()
    return hmac.new(salt, identity.encode(), hashlib.sha256).hexdigest()[:16]


def identities(state: ServerState, request: ChatCompletionRequest,
               raw_request: Request) -> tuple[str, str]:
    """(principal_hash, user_hash). The principal is who authenticated (the API key), which a
    client cannot vary; `user` only subdivides a principal, so it never widens a share."""
    principal = bearer_key(raw_request) or "anonymous"
    user = f"{principal}\0{request.user}" if request.user else principal
    return pseudonym(state, principal), pseudonym(state, user)


def opted_out(request: ChatCompletionRequest, raw_request: Request) -> bool:
    if raw_request.headers.get(OPT_OUT_HEADER, "").strip().lower() in ("1", "true", "yes"):
        return True
    metadata = (request.model_extra or {}).get("metadata") or {}
    return isinstance(metadata, dict) and metadata.get("train") in (False, "false")


def conversation_id(messages: list[dict[str, Any]], who: str, raw_request: Request,
                    request: ChatCompletionRequest) -> str:
    """Given by the client, or derived: later turns resend the same opening, so hashing the
    user and the first message groups a conversation's turns under one Kafka key."""
    metadata = (request.model_extra or {}).get("metadata") or {}
    given = raw_request.headers.get(CONVERSATION_HEADER) or (
        metadata.get("conversation_id") if isinstance(metadata, dict) else None
    )
    if given:
        return str(given)
    opening = json.dumps(messages[:1], sort_keys=True, default=str)
    return hashlib.sha256(f"{who}\0{opening}".encode()).hexdigest()[:32]


# -- the interaction being served ----------------------------------------------------------------
@dataclass
class Interaction:
    """What we know about one request while it is served; becomes an InteractionRecord."""

    state: ServerState
    route: Route
    request: ChatCompletionRequest
    messages: list[dict[str, Any]]
    principal: str
    user: str
    conversation: str
    log_for_training: bool
    started: float = field(default_factory=time.perf_counter)
    created_at: Any = field(default_factory=utc_now)
    ttft_s: float | None = None

    released: bool = False

    def release(self) -> None:
        """The adapter version may be evicted once no request uses it."""
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
        if not self.log_for_training:
            metrics.INTERACTIONS_OPTED_OUT.inc()
            return None
        if self.state.outbox is None:
            return None
        req = self.request
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        record = InteractionRecord(
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
                temperature=req.temperature, top_p=req.top_p,
                max_tokens=req.max_completion_tokens or req.max_tokens,
                n=req.n or 1, seed=req.seed, stop=stop,
            ),
            usage=usage or Usage(),
            latency_ms=latency_s * 1000,
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1000,
            finish_reason=choices[0].finish_reason if choices else None,
        )
        self.state.outbox.append(record)
        return record.id


async def _logged_stream(
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
        async for chunk in chunks:
            if chunk.startswith("data: {"):
                payload = json.loads(chunk[6:])
                if "error" in payload:
                    failed = True
                if payload.get("usage"):
                    usage = Usage(**{k: payload["usage"][k] for k in Usage.model_fields})
                for choice in payload.get("choices", ()):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        if interaction.ttft_s is None:
                            interaction.ttft_s = time.perf_counter() - interaction.started
                        texts.setdefault(choice["index"], []).append(delta["content"])
                    if choice.get("finish_reason"):
                        finish[choice["index"]] = choice["finish_reason"]
                if not client_wants_usage and not payload.get("choices") and payload.get("usage"):
                    continue
            yield chunk
        if failed:
            interaction.log_for_training = False
            interaction.finish(HTTPStatus.INTERNAL_SERVER_ERROR, [], usage)
            return
        indices = sorted(set(texts) | set(finish))
        choices = [Choice(index=i, content="".join(texts.get(i, [])), finish_reason=finish.get(i))
                   for i in indices]
        interaction.finish(HTTPStatus.OK, choices, usage)
    finally:  # also when the client disconnects mid-stream (the generator is closed)
        interaction.release()


# -- routes --------------------------------------------------------------------------------------
@router.post("/v1/chat/completions",
             dependencies=[Depends(validate_json_request), Depends(require_api_key)])
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    state = _state(raw_request)
    try:
        route = await resolve(state, request.model)
    except UnknownModel as exc:
        metrics.REQUESTS.labels(request.model, "none", "404").inc()
        return error_json(HTTPStatus.NOT_FOUND, str(exc), param="model")
    except AdapterRefused as exc:
        metrics.REQUESTS.labels(request.model, "none", "400").inc()
        return error_json(HTTPStatus.BAD_REQUEST, str(exc), param="model")

    # The body is already parsed and cached by FastAPI; the raw messages serialise cleanly.
    messages = (await raw_request.json())["messages"]
    principal, who = identities(state, request, raw_request)
    interaction = Interaction(
        state=state, route=route, request=request, messages=messages, principal=principal,
        user=who,
        conversation=conversation_id(messages, who, raw_request, request),
        log_for_training=not opted_out(request, raw_request),
    )
    client_wants_usage = bool(request.stream_options and request.stream_options.include_usage)
    if request.stream:
        options = request.stream_options or StreamOptions()
        request.stream_options = options.model_copy(update={"include_usage": True})
    request.model = route.engine_model
    headers = {VERSION_HEADER: interaction.version_label}

    try:
        result = await raw_request.app.state.openai_serving_chat.create_chat_completion(
            request, raw_request)
    except BaseException:  # cancelled by a disconnect, or an engine error
        interaction.release()
        raise
    if isinstance(result, ErrorResponse):
        interaction.log_for_training = False
        interaction.finish(result.error.code, [], None)
        return JSONResponse(result.model_dump(), status_code=result.error.code, headers=headers)
    if isinstance(result, ChatCompletionResponse):
        choices = [Choice(index=c.index, content=c.message.content or "",
                          finish_reason=c.finish_reason) for c in result.choices]
        usage = Usage(prompt_tokens=result.usage.prompt_tokens,
                      completion_tokens=result.usage.completion_tokens or 0,
                      total_tokens=result.usage.total_tokens)
        record_id = interaction.finish(HTTPStatus.OK, choices, usage)
        if record_id:
            headers[INTERACTION_HEADER] = record_id
        return JSONResponse(result.model_dump(), headers=headers)
    return StreamingResponse(_logged_stream(interaction, result, client_wants_usage),
                             media_type="text/event-stream", headers=headers)


async def resolve(state: ServerState, model: str) -> Route:
    """Alias → route; a pinned version that exists in the registry is loaded on first use."""
    try:
        route = state.aliases.resolve(model)
    except UnknownModel:
        version = state.aliases.pinned_version(model)
        if version is None or version not in state.registry.versions():
            raise
        await state.follower.ensure_loaded(version)
        route = state.aliases.resolve(model)
    if route.adapter_version is not None:
        state.follower.in_flight[route.adapter_version] += 1
    return route


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(raw_request: Request) -> JSONResponse:
    aliases = _state(raw_request).aliases
    max_len = raw_request.app.state.vllm_config.model_config.max_model_len
    cards = [ModelCard(id=name, root=aliases.resolve(name).engine_model,
                       parent=None if name == aliases.served_name else aliases.served_name,
                       owned_by="dynalign", max_model_len=max_len)
             for name in aliases.names()]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/health")
async def health(raw_request: Request) -> Response:
    try:
        await raw_request.app.state.engine_client.check_health()
    except Exception as exc:
        return error_json(HTTPStatus.SERVICE_UNAVAILABLE, f"engine unhealthy: {exc}")
    return Response(status_code=200)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# -- request size guard --------------------------------------------------------------------------
class RequestSizeLimit:
    """Refuse bodies over the limit before they are read into memory (400, OpenAI-style)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(HTTPStatus.BAD_REQUEST, self._message())
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"Request body exceeds the limit of {self.max_bytes} bytes."

    async def _refuse(self, scope, receive, send):
        await error_json(HTTPStatus.BAD_REQUEST, self._message())(scope, receive, send)


# -- app -----------------------------------------------------------------------------------------
def create_app(cfg: DynalignConfig, outbox: Outbox | None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine and the outbox and stops both."""
    vllm_args = parse_vllm_args(vllm_cli_args(cfg.model))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with serving_state(app.state, vllm_args):
            state: ServerState = app.state.dynalign
            follower = AdapterFollower(cfg, state.registry, state.aliases,
                                       app.state.openai_serving_models,
                                       await asyncio.to_thread(base_fingerprint, vllm_args.model))
            state.follower = follower
            metrics.LIVE_ADAPTER_VERSION.set(0)
            # Serve what the registry says is live from the first request on.
            try:
                await follower.sync()
            except AdapterRefused as exc:
                log.error("live adapter refused at start-up, serving base: %s", exc)
            follow_task = asyncio.create_task(follower.run())
            if cfg.kafka.bootstrap:
                follower.watch_topic(asyncio.get_running_loop())
            if outbox is not None:
                outbox.start()
            try:
                yield
            finally:
                follower.stop()
                follow_task.cancel()
                if outbox is not None:
                    outbox.close()

    app = FastAPI(title="dynalign", lifespan=lifespan)
    app.state.args = vllm_args  # vLLM's exception handlers read it
    app.state.dynalign = ServerState(
        cfg=cfg,
        aliases=AliasTable(cfg.model.served_name),
        outbox=outbox,
        registry=Registry(cfg.registry.store),
        api_keys=frozenset(k.get_secret_value() for k in cfg.serving.api_keys),
        operator_tokens=frozenset(k.get_secret_value() for k in cfg.serving.operator_tokens),
    )
    app.include_router(router)
    app.include_router(admin_router)
    init_exception_handler(app)  # vLLM's: every error becomes OpenAI-style JSON, never a bare 500
    app.add_middleware(RequestSizeLimit, max_bytes=cfg.serving.max_request_bytes)
    return app
