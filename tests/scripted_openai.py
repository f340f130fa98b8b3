"""A scripted OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, real openai client.

A test gives a `responder(request) -> str | ScriptedReply` that picks the answer by reading the
request (model, messages). The server logs every request, can fail the next N requests with a
status code (to exercise retries), and can delay answers (so a run can be interrupted midway).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class ScriptedReply:
    text: str
    # Candidates at the first answer position, as (token, logprob); sent when logprobs=True.
    top_logprobs: list[tuple[str, float]] | None = None
    finish_reason: str = "stop"  # "length": cut by the token limit


Responder = Callable[[dict[str, Any]], "str | ScriptedReply"]


def last_user_message(request: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "user")


@dataclass
class ScriptedOpenAI:
    responder: Responder
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # those answered
    failed: list[dict[str, Any]] = field(default_factory=list)  # those failed on purpose
    failures: list[int] = field(default_factory=list)  # status codes still to answer with
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def fail_next(self, count: int, status: int = 503) -> None:
        self.failures.extend([status] * count)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            if self.failures:
                self.failed.append(body)
                status = self.failures.pop(0)
                return JSONResponse(
                    {"error": {"message": "scripted failure", "code": status}}, status_code=status
                )
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.requests.append(body)
            reply = self.responder(body)
            if isinstance(reply, str):
                reply = ScriptedReply(reply)
            return JSONResponse(_completion(body, reply))

        return app

    def __enter__(self) -> ScriptedOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; no race with other tests
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("scripted OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _completion(request: dict[str, Any], reply: ScriptedReply) -> dict[str, Any]:
    logprobs = None
    if request.get("logprobs") and reply.top_logprobs:
        first_token, first_logprob = reply.top_logprobs[0]
        logprobs = {
            "content": [
                {
                    "token": first_token,
                    "logprob": first_logprob,
                    "bytes": None,
                    "top_logprobs": [
                        {"token": t, "logprob": lp, "bytes": None} for t, lp in reply.top_logprobs
                    ],
                }
            ]
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "finish_reason": reply.finish_reason,
                "message": {"role": "assistant", "content": reply.text},
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
