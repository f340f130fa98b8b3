"""HTTP routes (only): status codes, headers, and OpenAI-style error bodies. What a request does
lives in serving/chat.py; who may call lives in serving/deps.py.

Every refusal is OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}), so the
official SDKs raise their typed exceptions with the server's message.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import metrics
from serving.adapters import AdapterRefused
from serving.aliases import UnknownModel
from serving.chat import BadRequest, serve_chat, serve_completion, start_interaction
from serving.deps import Caller, require_api_key, server_state
from serving.feedback import FeedbackRefused, FeedbackRequest, record_feedback
from serving.limits import LimitExceeded
from shared.vllm_compat import (
    VLLM_VERSION,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    validate_json_request,
    with_cancellation,
)

router = APIRouter()


def error_json(
    status: HTTPStatus,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {"message": message, "type": status.phrase, "param": param, "code": status.value}
    }
    return JSONResponse(body, status_code=status.value, headers=headers)


def refusal(exc: Exception) -> JSONResponse | None:
    """The response for a request dynalign refuses before the engine runs (None: not ours)."""
    if isinstance(exc, BadRequest):
        return error_json(HTTPStatus.BAD_REQUEST, str(exc), exc.param)
    if isinstance(exc, UnknownModel):
        return error_json(HTTPStatus.NOT_FOUND, str(exc), "model")
    if isinstance(exc, AdapterRefused):
        return error_json(HTTPStatus.BAD_REQUEST, str(exc), "model")
    if isinstance(exc, PermissionError):
        return error_json(HTTPStatus.FORBIDDEN, str(exc), "model")
    if isinstance(exc, LimitExceeded):
        return error_json(
            HTTPStatus.TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        )
    return None


def _respond(result, headers: dict[str, str]) -> Response:
    if hasattr(result, "error"):  # vLLM's ErrorResponse
        return JSONResponse(result.model_dump(), status_code=result.error.code, headers=headers)
    if hasattr(result, "model_dump"):
        return JSONResponse(result.model_dump(), headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


async def _refused(raw_request: Request, model: str, exc: Exception) -> Response:
    response = refusal(exc)
    if response is None:
        raise exc
    label = server_state(raw_request).aliases.metric_label(model)
    metrics.REQUESTS.labels(label, "none", str(response.status_code)).inc()
    return response


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
@with_cancellation
async def create_chat_completion(
    request: ChatCompletionRequest, raw_request: Request, caller: Caller = Depends(require_api_key)
):
    state = server_state(raw_request)
    try:
        interaction = await start_interaction(state, caller, request, raw_request)
    except Exception as exc:  # noqa: BLE001 - refusal() re-raises what is not a refusal
        return await _refused(raw_request, request.model, exc)
    return _respond(*await serve_chat(interaction, raw_request))


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)])
@with_cancellation
async def create_completion(
    request: CompletionRequest, raw_request: Request, caller: Caller = Depends(require_api_key)
):
    state = server_state(raw_request)
    model = request.model or state.aliases.served_name
    request.model = model
    try:
        result, headers = await serve_completion(state, caller, request, raw_request)
    except Exception as exc:  # noqa: BLE001
        return await _refused(raw_request, model, exc)
    return _respond(result, headers)


@router.post("/v1/feedback")
async def create_feedback(
    request: FeedbackRequest, raw_request: Request, caller: Caller = Depends(require_api_key)
) -> Response:
    """A rating of an answer by the key it was served to (serving/feedback.py), under the same
    per-client limits as chat."""
    state = server_state(raw_request)
    try:
        permit = state.limits.admit(caller.principal)
    except LimitExceeded as exc:
        return refusal(exc)
    try:
        recorded = await record_feedback(state, caller, request)
    except FeedbackRefused as exc:
        return error_json(HTTPStatus(exc.status), str(exc), exc.param or None)
    finally:
        permit.release()
    return JSONResponse(recorded.model_dump())


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(raw_request: Request) -> JSONResponse:
    aliases = server_state(raw_request).aliases
    max_len = raw_request.app.state.vllm_config.model_config.max_model_len
    cards = [
        ModelCard(
            id=name,
            root=aliases.resolve(name).engine_model,
            parent=None if name == aliases.served_name else aliases.served_name,
            owned_by="dynalign",
            max_model_len=max_len,
        )
        for name in aliases.names()
    ]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/health")
async def health(raw_request: Request) -> Response:
    """200 when the engine answers and the outbox can persist records: a replica that would
    lose interactions takes no traffic. Under `dynalign up` the body names the processes beside
    the server (the learner: running or starting, its restarts and last exit code); one that
    is restarting does not take the server out, which serves its last adapter meanwhile."""
    try:
        await raw_request.app.state.engine_client.check_health()
    except Exception as exc:
        return error_json(HTTPStatus.SERVICE_UNAVAILABLE, f"engine unhealthy: {exc}")
    outbox = server_state(raw_request).outbox
    if outbox is not None and (problem := outbox.problem):
        return error_json(HTTPStatus.SERVICE_UNAVAILABLE, f"outbox: {problem}")
    if processes := server_state(raw_request).processes:
        return JSONResponse({"processes": processes()})
    return Response(status_code=200)


@router.get("/version")
async def version() -> JSONResponse:
    from importlib.metadata import version as dist_version

    return JSONResponse({"version": VLLM_VERSION, "dynalign": dist_version("dynalign")})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    # Rendering walks every series; off the event loop so a scrape never stalls serving.
    return Response(await asyncio.to_thread(generate_latest), media_type=CONTENT_TYPE_LATEST)


# The API's description is behind the same keys as the API (FastAPI's own /docs and
# /openapi.json are turned off in create_app).
@router.get("/openapi.json", dependencies=[Depends(require_api_key)], include_in_schema=False)
async def openapi(raw_request: Request) -> JSONResponse:
    return JSONResponse(raw_request.app.openapi())


@router.get("/docs", dependencies=[Depends(require_api_key)], include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="dynalign")
