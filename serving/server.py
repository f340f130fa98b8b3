"""The OpenAI-compatible server: vLLM's protocol layer and engine, plus what dynalign adds —
model aliases over adapter versions (and a canary's share of users), API keys and per-client
limits, training opt-out, the interaction log, and users' ratings of answers.

    serving/routes.py   HTTP routes and error bodies     serving/deps.py    state, callers, auth
    serving/chat.py     request → engine → record        serving/limits.py  per-client limits
    serving/admin.py    operator routes                  serving/adapters.py hot swap
    serving/feedback.py users' ratings, interaction ids  serving/aliases.py  names, canary split
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, HTTPException
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics
from serving.adapters import AdapterFollower, AdapterRefused
from serving.admin import router as admin_router
from serving.deps import ServerState
from serving.engine import serving_state
from serving.outbox import Outbox
from serving.rollout import RolloutAdapters, UsersFirst
from serving.rollout import router as rollout_router
from serving.routes import error_json, router
from shared.config import DynalignConfig
from shared.engine import parse_vllm_args, vllm_cli_args
from shared.registry import base_fingerprint
from shared.vllm_compat import http_exception_handler, init_exception_handler

log = logging.getLogger(__name__)


class InsecureConfig(ValueError):
    """The server would run open to the network, or without a secret it needs."""


def check_exposure(cfg: DynalignConfig) -> None:
    """Refuse to serve a non-loopback address without API keys (unless insecure_no_auth), or
    without a salt for the user pseudonyms."""
    s = cfg.serving
    if s.user_hash_salt is None:
        raise InsecureConfig(
            "serving.user_hash_salt is required: a secret salt for the HMAC pseudonyms of users "
            "in the interaction log (set DYNALIGN_SERVING__USER_HASH_SALT; `dynalign up` "
            "generates one)"
        )
    if not s.api_keys and not s.insecure_no_auth and not _is_loopback(s.host):
        raise InsecureConfig(
            f"refusing to serve {s.host} without API keys: set serving.api_keys "
            "(DYNALIGN_SERVING__API_KEYS) or pass --insecure-no-auth"
        )


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


class RequestSizeLimit:
    """Refuse bodies over the limit before they are read into memory (400, OpenAI-style)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await error_json(HTTPStatus.BAD_REQUEST, self._message())(scope, receive, send)
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


def create_app(
    cfg: DynalignConfig, outbox: Outbox | None, processes: Callable[[], dict] | None = None
) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine and the outbox and stops both.
    `processes`: what runs beside the server (`up`'s supervisor), for /health."""
    check_exposure(cfg)
    vllm_args = parse_vllm_args(vllm_cli_args(cfg.model, cfg.serving))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with serving_state(app.state, vllm_args):
            state: ServerState = app.state.dynalign
            follower = AdapterFollower(
                cfg,
                state.registry,
                state.aliases,
                app.state.openai_serving_models,
                await asyncio.to_thread(base_fingerprint, vllm_args.model),
            )
            state.follower = follower
            metrics.LIVE_ADAPTER_VERSION.set(0)
            # A crash between an audit line and the state file, or a garbled state file, is
            # repaired from the audit log before anything reads the registry.
            await asyncio.to_thread(state.lifecycle.reconcile)
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
                follower.close()
                app.state.rollout_adapters.close()

    app = FastAPI(
        title="dynalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )  # served behind the API keys by serving/routes.py
    app.state.args = vllm_args  # vLLM's exception handlers read it
    app.state.dynalign = ServerState.from_config(cfg, outbox)
    app.state.dynalign.processes = processes
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(rollout_router)
    app.state.rollout_adapters = RolloutAdapters()
    settings = cfg.serving
    app.state.rollout_turns = UsersFirst(
        settings.rollout_prefill_tokens, settings.rollout_max_hold_s, app.state.dynalign.limits.idle
    )
    init_exception_handler(app)  # vLLM's: every error becomes OpenAI-style JSON, never a bare 500
    # ... except Starlette's own HTTPException (vLLM registers FastAPI's subclass), which FastAPI
    # raises for an undecodable body and Starlette for an unknown route or method.
    app.exception_handler(StarletteHTTPException)(http_exception_handler)
    app.add_middleware(RequestSizeLimit, max_bytes=cfg.serving.max_request_bytes)
    return app
