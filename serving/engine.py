"""The in-process vLLM engine and vLLM's own OpenAI serving layer, configured from our config.

We build the same argument list `vllm serve` would take and parse it with vLLM's own parser, so
every engine and protocol default is vLLM's, and the serving benchmark can start `vllm serve`
with exactly these arguments as its anchor.
"""

from __future__ import annotations

import os
from argparse import Namespace
from contextlib import asynccontextmanager
from typing import AsyncIterator

from shared.config import ModelConfig


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.path:
        return cfg.path
    from shared.assets import smollm2_dir

    return str(smollm2_dir())


def engine_kwargs(cfg: ModelConfig, max_loras: int | None = None) -> dict:
    """vLLM EngineArgs for our engine: the server (as `vllm serve` flags) and the learner's
    rollout engine (as `vllm.LLM(**kwargs)`) both take them from here."""
    gpu = has_gpu()
    kwargs = dict(
        model=resolve_model_path(cfg),
        # CPUs without bf16 units (AVX2) run float32 ~5x faster than bfloat16.
        dtype=cfg.dtype if cfg.dtype != "auto" else ("auto" if gpu else "float32"),
        enable_lora=True,
        max_lora_rank=cfg.max_lora_rank,
        max_loras=max_loras or cfg.max_loras,
        seed=cfg.seed,
        enforce_eager=cfg.enforce_eager or not gpu,
    )
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        # vLLM's CPU backend sizes its KV cache from this (GiB); 1 GiB holds our loads.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return kwargs


def vllm_cli_args(cfg: ModelConfig) -> list[str]:
    """Arguments for `vllm serve` (model first, without host/port) that match our engine."""
    kwargs = engine_kwargs(cfg)
    args = [kwargs.pop("model"), "--served-model-name", cfg.served_name, "--disable-log-stats"]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def parse_vllm_args(argv: list[str]) -> Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="dynalign"))
    args = parser.parse_args(["--model", argv[0], *argv[1:]])
    validate_parsed_serve_args(args)
    return args


@asynccontextmanager
async def serving_state(state, args: Namespace) -> AsyncIterator[None]:
    """Start the async engine and fill `state` (a Starlette app.state) with vLLM's serving
    objects: openai_serving_chat, openai_serving_models, ..."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        await init_app_state(engine_client, state, args, supported_tasks)
        yield
