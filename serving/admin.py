"""Operator routes: the adapter lifecycle over HTTP, guarded by operator tokens (never chat keys).

Each action changes the registry (the truth, audited under the operator's configured name),
announces it on `dynalign.adapters` for the other replicas, and is applied to this server before
the response returns.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from serving.adapters import AdapterRefused
from serving.deps import require_operator, server_state
from shared.registry import RegistryError, RegistryState

router = APIRouter(prefix="/admin")


class ActionBody(BaseModel):
    reason: str = ""


class RollbackBody(ActionBody):
    to: int | None = None


class PromoteBody(ActionBody):
    override: bool = False  # a rejected version; audited as "promote-override"


class CanaryBody(ActionBody):
    share: float | None = None  # default: gate.canary_share


class ExtendBody(ActionBody):
    max_ratings: int


class DecideBody(ActionBody):
    outcome: Literal["promote", "rollback"]


def describe(registry, state: RegistryState, loaded: set[int]) -> dict:
    versions = []
    for version in registry.versions():
        manifest = registry.manifest(version)
        versions.append(
            {
                "version": version,
                "state": state.states.get(version, "candidate"),
                "loaded": version in loaded,
                "parent_version": manifest.parent_version,
                "steps": manifest.steps,
                "created_at": manifest.created_at.isoformat(),
                "metrics": manifest.metrics,
                "gate": state.gate_json(version),
            }
        )
    return {
        "live": state.live,
        "pinned": state.pinned,
        "learning_paused": state.learning_paused,
        "canary": state.canary and state.canary.model_dump(mode="json"),
        "revision": state.revision,
        "versions": versions,
    }


async def _apply(raw_request: Request, change) -> dict:
    """Run a lifecycle change (checked, audited, announced by shared/lifecycle.py) and apply it
    to this server before answering."""
    state = server_state(raw_request)
    try:
        new_state = await asyncio.to_thread(change, state.lifecycle)
    except RegistryError as exc:
        raise HTTPException(HTTPStatus.CONFLICT, str(exc)) from exc
    try:
        await state.follower.sync()
    except AdapterRefused as exc:
        raise HTTPException(HTTPStatus.BAD_REQUEST, str(exc)) from exc
    return describe(state.registry, new_state, state.aliases.loaded)


@router.get("/adapters")
async def list_adapters(raw_request: Request, actor: str = Depends(require_operator)) -> dict:
    state = server_state(raw_request)
    return describe(state.registry, state.registry.read_state(), state.aliases.loaded)


@router.post("/adapters/{version}/promote")
async def promote(
    version: int, body: PromoteBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    state = server_state(raw_request)
    # Refuse before the alias moves: the registry never points at unservable weights.
    problems = await asyncio.to_thread(
        state.lifecycle.servable_problems,
        version,
        state.follower.fingerprint,
        state.cfg.model.max_lora_rank,
    )
    if problems:
        status = HTTPStatus.CONFLICT if "does not exist" in problems[0] else HTTPStatus.BAD_REQUEST
        raise HTTPException(status, "; ".join(problems))
    return await _apply(
        raw_request, lambda lc: lc.promote(version, actor, body.reason, override=body.override)
    )


@router.post("/adapters/rollback")
async def rollback(
    body: RollbackBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    return await _apply(raw_request, lambda lc: lc.rollback(actor, to=body.to, reason=body.reason))


@router.post("/adapters/{version}/canary")
async def start_canary(
    version: int, body: CanaryBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    rule = server_state(raw_request).cfg.gate.canary_rule(body.share)
    if not rule["share"]:
        raise HTTPException(HTTPStatus.BAD_REQUEST, "share is needed (gate.canary_share is 0)")
    return await _apply(raw_request, lambda lc: lc.start_canary(version, rule, actor, body.reason))


@router.post("/canary/stop")
async def stop_canary(
    body: ActionBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    return await _apply(raw_request, lambda lc: lc.end_canary("stop", actor, body.reason))


@router.post("/canary/extend")
async def extend_canary(
    body: ExtendBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    return await _apply(
        raw_request, lambda lc: lc.extend_canary(body.max_ratings, actor, body.reason)
    )


@router.post("/canary/decide")
async def decide_canary(
    body: DecideBody, raw_request: Request, actor: str = Depends(require_operator)
) -> dict:
    return await _apply(
        raw_request,
        lambda lc: lc.end_canary(body.outcome, actor, body.reason or f"operator: {body.outcome}"),
    )


def _flag_route(path: str, action: str) -> None:
    async def handler(
        body: ActionBody, raw_request: Request, actor: str = Depends(require_operator)
    ) -> dict:
        return await _apply(raw_request, lambda lc: lc.set_flag(action, actor, body.reason))

    router.post(path, name=action.replace("-", "_"))(handler)


_flag_route("/pin", "pin")
_flag_route("/unpin", "unpin")
_flag_route("/learning/pause", "pause-learning")
_flag_route("/learning/resume", "resume-learning")
