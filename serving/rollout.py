"""The learner's routes: rollouts and self-scores on this server's engine (one engine serves and
rolls out; the learner holds only the trainer, like TRL's vLLM server mode, prime-rl and ART).

    PUT    /admin/rollout/adapters/{name}       load <registry.rollout_dir>/<name> under `name`
    DELETE /admin/rollout/adapters/{name}       evict it (and forget its files' copy)
    POST   /admin/rollout/v1/chat/completions   vLLM's chat, on the base model or such an adapter

Only an operator token reaches them (`dynalign up` makes one for its learner). What they run is
never logged to the interaction log, never counted against users' limits or caps, and runs
behind users' requests: the engine schedules by priority (shared/engine.py) and these requests
carry ROLLOUT_PRIORITY, after users' 0. A name is loaded once per server: the learner's weights
change every step, and vLLM keys its prefix cache by adapter name, so a name is never reused.
The request names the adapter, never a path: the files come from the configured directory only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.adapters import unload_adapter
from serving.deps import require_operator, server_state
from serving.routes import error_json
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
    result = await raw_request.app.state.openai_serving_chat.create_chat_completion(
        request, raw_request
    )
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    return JSONResponse(result.model_dump())
