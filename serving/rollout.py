"""The learner's routes: rollouts and self-scores on this server's engine (one engine serves and
rolls out; the learner holds only the trainer, like TRL's vLLM server mode, prime-rl and ART).

    PUT    /admin/rollout/adapters/{name}       load <registry.rollout_dir>/<name> under `name`
    DELETE /admin/rollout/adapters/{name}       evict it (and forget its files' copy)
    POST   /admin/rollout/v1/chat/completions   vLLM's chat, on the base model or such an adapter

Only an operator token reaches them (`dynalign up` makes one for its learner). What they run is
never logged to the interaction log and never counted against users' limits or caps.

Users first. vLLM's priority scheduling (shared/engine.py; these requests carry
ROLLOUT_PRIORITY, users keep 0) orders its waiting queue only: requests it has started share
every engine step with users' requests. While the learner's self-scores (prefill, one token
each) ran, a user's 32-token chat took the whole reward phase, 11-16 s against 1.6-2.3 s idle,
whether 16 of them ran at once, 4 or 2, at a step budget of 4096 tokens or 1024: each of the
user's decode steps carried a prefill chunk (bench/results/users_first_engine*.json). So
`UsersFirst` starts a learner's request only once no user's request is in flight (or once it
has waited serving.rollout_max_hold_s: a server never idle of users still lets the learner
move), and bounds the learner's prompt tokens in flight by serving.rollout_prefill_tokens, so
that a user arriving just after learner requests started waits behind ~2 prefills at most;
counting tokens, not requests, leaves the gate's many short prompts batched (2 requests at once
took its answers from 8 s to 37-43 s).
A name is loaded once per server: the learner's weights
change every step, and vLLM keys its prefix cache by adapter name, so a name is never reused.
The request names the adapter, never a path: the files come from the configured directory only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving import metrics
from serving.adapters import unload_adapter
from serving.deps import require_operator, server_state
from serving.routes import error_json
from shared.chat import NotText, content_text
from shared.registry import verify_working_adapter
from shared.vllm_compat import ChatCompletionRequest, ErrorResponse, validate_json_request

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin/rollout", dependencies=[Depends(require_operator)])

# vLLM runs lower values first; users' requests keep vLLM's default, 0.
ROLLOUT_PRIORITY = 1
# Adapters the learner holds at once on one server: its policy, a candidate and live (the gate).
# When they are taken, a new learner session (the name's second part) takes those of other
# sessions, oldest first: a learner killed mid-step, or restarted by `up`, never evicted its own.
MAX_ROLLOUT_ADAPTERS = 4
CHARS_PER_TOKEN = 4
MESSAGE_TOKENS = 4
# Apart from the engine names of adapter versions ("<served name>-v<N>", serving/aliases.py).
NAME = re.compile(r"rollout-[A-Za-z0-9._-]{1,120}")


class RolloutAdapters:
    """The learner's adapters loaded on this server, by name."""

    def __init__(self) -> None:
        self.loaded: dict[str, Path] = {}  # name -> private copy the engine loaded
        self.seen: set[str] = set()
        self.lock = asyncio.Lock()
        self.private_dir = Path(tempfile.mkdtemp(prefix="dynalign-rollout-"))

    def close(self) -> None:
        shutil.rmtree(self.private_dir, ignore_errors=True)

    def oldest_of_another_session(self, name: str) -> str | None:
        return next((n for n in self.loaded if _session(n) != _session(name)), None)


class UsersFirst:
    """Turns for the learner's requests (see the module's docstring)."""

    def __init__(self, prefill_tokens: int, max_hold_s: float, users_idle: asyncio.Event) -> None:
        self.prefill_tokens = prefill_tokens
        self.max_hold_s = max_hold_s
        self.users_idle = users_idle
        self.in_flight = 0  # prompt tokens of the learner's requests running
        self.freed = asyncio.Condition()

    @asynccontextmanager
    async def turn(self, prompt_tokens: int) -> AsyncIterator[None]:
        # A prompt over the whole budget runs alone.
        cost = min(prompt_tokens, self.prefill_tokens) if self.prefill_tokens else 0
        started = time.perf_counter()
        async with self.freed:
            await self.freed.wait_for(lambda: self.in_flight + cost <= self.prefill_tokens)
            self.in_flight += cost
        try:
            if not self.users_idle.is_set():
                try:
                    await asyncio.wait_for(self.users_idle.wait(), self.max_hold_s)
                except TimeoutError:
                    metrics.ROLLOUT_HOLD_EXPIRED.inc()
            metrics.ROLLOUT_WAIT.observe(time.perf_counter() - started)
            yield
        finally:
            async with self.freed:
                self.in_flight -= cost
                self.freed.notify_all()


def prompt_tokens(request: ChatCompletionRequest) -> int:
    """About how many tokens the request's prompt has: ~4 characters a token in English, plus a
    few a message for the chat template; a budget's unit, not a count (tokenizing here would
    render every prompt twice)."""
    chars = 0
    for message in request.messages:
        content = message.get("content") if isinstance(message, dict) else None
        try:
            chars += len(content_text(content))
        except NotText:
            pass  # the engine refuses it anyway
    return chars // CHARS_PER_TOKEN + MESSAGE_TOKENS * len(request.messages)


def _session(name: str) -> str:
    """rollout-<session>-<prefix>-<n> (learner/served.py)."""
    return name.split("-", 2)[1]


def _error(status: HTTPStatus, message: str, param: str | None = None) -> JSONResponse:
    return error_json(status, message, param)


def _adapters(request: Request) -> RolloutAdapters:
    return request.app.state.rollout_adapters


@router.put("/adapters/{name}")
async def load(name: str, raw_request: Request) -> Response:
    from shared.vllm_compat import LoadLoRAAdapterRequest

    state = server_state(raw_request)
    adapters = _adapters(raw_request)
    if not NAME.fullmatch(name):
        return _error(HTTPStatus.BAD_REQUEST, f"not a rollout adapter name: {name!r}", "name")
    async with adapters.lock:
        if name in adapters.seen:
            return _error(HTTPStatus.CONFLICT, f"{name} was loaded before; names are never reused")
        stale = None
        if len(adapters.loaded) >= MAX_ROLLOUT_ADAPTERS:
            stale = adapters.oldest_of_another_session(name)
            if stale is None:
                return _error(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    f"{len(adapters.loaded)} rollout adapters of this session loaded, the most a "
                    "server holds; evict one first",
                )
        verified = await asyncio.to_thread(
            verify_working_adapter,
            state.cfg.registry.rollout_dir / name,
            state.cfg.model.max_lora_rank,
        )
        if verified.problems:
            return _error(HTTPStatus.BAD_REQUEST, "; ".join(verified.problems))
        private = await asyncio.to_thread(verified.materialize, adapters.private_dir / name)
        if stale is not None:
            log.warning("rollout: evicting %s, another learner session's, for %s", stale, name)
            await _unload(raw_request, adapters, stale)
        result = await raw_request.app.state.openai_serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(private))
        )
        if isinstance(result, ErrorResponse):
            shutil.rmtree(private, ignore_errors=True)
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        adapters.seen.add(name)
        adapters.loaded[name] = private
    return Response(status_code=HTTPStatus.NO_CONTENT)


@router.delete("/adapters/{name}")
async def evict(name: str, raw_request: Request) -> Response:
    adapters = _adapters(raw_request)
    async with adapters.lock:
        if name not in adapters.loaded:
            return _error(HTTPStatus.NOT_FOUND, f"no rollout adapter {name!r} is loaded", "name")
        await _unload(raw_request, adapters, name)
    return Response(status_code=HTTPStatus.NO_CONTENT)


async def _unload(raw_request: Request, adapters: RolloutAdapters, name: str) -> None:
    """With adapters.lock held."""
    private = adapters.loaded.pop(name)
    await unload_adapter(raw_request.app.state.openai_serving_models, name)
    shutil.rmtree(private, ignore_errors=True)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
async def chat(request: ChatCompletionRequest, raw_request: Request) -> Response:
    state = server_state(raw_request)
    if request.stream:
        return _error(HTTPStatus.BAD_REQUEST, "rollouts are not streamed", "stream")
    # The base model is vLLM's own name for it (what users reach as "<served name>@base").
    base = state.aliases.served_name
    if request.model != base and request.model not in _adapters(raw_request).loaded:
        return _error(
            HTTPStatus.NOT_FOUND,
            f"{request.model!r} is neither {base!r} (the base model) nor a loaded rollout adapter",
            "model",
        )
    request.priority = ROLLOUT_PRIORITY
    async with raw_request.app.state.rollout_turns.turn(prompt_tokens(request)):
        result = await raw_request.app.state.openai_serving_chat.create_chat_completion(
            request, raw_request
        )
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    return JSONResponse(result.model_dump())
