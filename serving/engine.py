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


def vllm_cli_args(cfg: ModelConfig) -> list[str]:
    """Arguments for `vllm serve` (without host/port) that match our engine."""
    # CPUs without bf16 units (AVX2) run float32 ~5x faster than bfloat16.
    dtype = cfg.dtype if cfg.dtype != "auto" else ("auto" if has_gpu() else "float32")
    args = [
        resolve_model_path(cfg),
        "--served-model-name", cfg.served_name,
        "--dtype", dtype,
        "--enable-lora",
        "--max-lora-rank", str(cfg.max_lora_rank),
        "--max-loras", str(cfg.max_loras),
        "--seed", str(cfg.seed),
        "--disable-log-stats",
    ]
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.enforce_eager or not has_gpu():
        args.append("--enforce-eager")
    if has_gpu():
        args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    else:
        # vLLM's CPU backend sizes its KV cache from this (GiB); 1 GiB holds our test loads.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
