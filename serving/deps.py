"""What every route depends on: the server's state and who is calling.

Three kinds of caller: a chat client (an API key, or anyone when the server runs without keys),
an operator (a token bound to a name in `serving.operator_tokens`; operators may also chat and
pin unreleased versions), and nobody (401). Keys and tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import HTTPException, Request

from serving.aliases import AliasTable
from serving.limits import ClientLimits
from serving.optout import OptOuts
from serving.outbox import Outbox
from shared.config import DynalignConfig
from shared.lifecycle import Lifecycle
from shared.registry import Registry


@dataclass
class ServerState:
    cfg: DynalignConfig
    aliases: AliasTable
    outbox: Outbox | None
    lifecycle: Lifecycle
    limits: ClientLimits
    opt_outs: OptOuts
    api_keys: tuple[bytes, ...] = ()
    operator_tokens: dict[str, bytes] = field(default_factory=dict)  # name -> token
    follower: object = None  # serving.adapters.AdapterFollower, set once the engine is up
    # The processes `dynalign up` runs beside this server, by name (dynalign/supervisor.py),
    # for /health's body; None under `dynalign serve`.
    processes: Callable[[], dict] | None = None

    @classmethod
    def from_config(cls, cfg: DynalignConfig, outbox: Outbox | None) -> ServerState:
        s = cfg.serving
        return cls(
            cfg=cfg,
            aliases=AliasTable(cfg.model.served_name),
            outbox=outbox,
            lifecycle=Lifecycle.from_config(cfg),
            limits=ClientLimits(
                s.max_concurrent_per_client,
                s.rate_limit_per_client,
                s.rate_limit_burst,
                s.max_in_flight,
            ),
            opt_outs=OptOuts(s.outbox_dir if outbox is not None else None),
            api_keys=tuple(k.get_secret_value().encode() for k in s.api_keys),
            operator_tokens={
                name: t.get_secret_value().encode() for name, t in s.operator_tokens.items()
            },
        )

    @property
    def registry(self) -> Registry:
        return self.lifecycle.registry

    @property
    def salt(self) -> bytes:
        """serving.user_hash_salt: the key of every HMAC the server makes (pseudonyms,
        interaction ids); replicas of one deployment share it."""
        return self.cfg.serving.user_hash_salt.get_secret_value().encode()

    def pseudonym(self, identity: str) -> str:
        return hmac.new(self.salt, identity.encode(), hashlib.sha256).hexdigest()[:16]


def server_state(request: Request) -> ServerState:
    return request.app.state.dynalign


@dataclass(frozen=True)
class Caller:
    """`principal` is what limits and training shares count against: the key itself (never
    logged; records carry its HMAC), or the client's address when the server has no keys."""

    principal: str
    operator: str | None = None  # the operator's configured name
    authenticated: bool = False


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return token or None


def _matches(token: bytes, secrets) -> bool:
    # Compare against every secret without stopping early, so timing says nothing about which
    # (or whether one) matched.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(token, secret)
    return found


def _operator_name(state: ServerState, token: bytes) -> str | None:
    name = None
    for candidate, secret in state.operator_tokens.items():
        if hmac.compare_digest(token, secret):
            name = candidate
    return name


def identify(request: Request) -> Caller:
    """Who is calling a chat route; 401 when keys are configured and none matches."""
    state = server_state(request)
    token = bearer_token(request)
    raw = token.encode() if token else b""
    if token and (operator := _operator_name(state, raw)):
        return Caller(principal=f"operator:{operator}", operator=operator, authenticated=True)
    if token and _matches(raw, state.api_keys):
        return Caller(principal=f"key:{token}", authenticated=True)
    if state.api_keys:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "Invalid or missing API key.")
    # An open server (loopback, or --insecure-no-auth): any bearer is unverified, so a client's
    # share is counted by its address, which it cannot vary per request.
    host = request.client.host if request.client else "unknown"
    return Caller(principal=f"address:{host}")


async def require_api_key(request: Request) -> Caller:
    caller = identify(request)
    request.state.caller = caller
    return caller


async def require_operator(request: Request) -> str:
    """The operator's configured name, for the audit log. 401 without a valid token, 403 for a
    chat API key."""
    state = server_state(request)
    token = bearer_token(request)
    raw = token.encode() if token else b""
    if token and (name := _operator_name(state, raw)):
        return name
    if token and _matches(raw, state.api_keys):
        raise HTTPException(HTTPStatus.FORBIDDEN, "A chat API key cannot use operator routes.")
    raise HTTPException(HTTPStatus.UNAUTHORIZED, "Operator token required.")
