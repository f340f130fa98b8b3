"""The in-process vLLM engine with vLLM's own OpenAI serving layer on the app's state."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


@asynccontextmanager
async def serving_state(state, args: Namespace) -> AsyncIterator[None]:
    """Start the async engine and fill `state` (a Starlette app.state) with vLLM's serving
    objects: openai_serving_chat, openai_serving_models, ..."""
    from shared.vllm_compat import build_async_engine_client, init_app_state

    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        await init_app_state(engine_client, state, args, supported_tasks)
        yield
