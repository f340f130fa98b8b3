"""The vLLM engine's arguments and the model it serves, for both sides of the loop: the server
(`vllm serve` flags, parsed by vLLM's own parser) and the learner's rollout engine
(`vllm.LLM(**kwargs)`).

We build the same argument list `vllm serve` would take and parse it with vLLM's own parser, so
every engine and protocol default is vLLM's, and the serving benchmark can start `vllm serve`
with exactly these arguments as its anchor. Any other `vllm serve` flag passes through
`model.engine_args` (`--engine-arg KEY=VALUE`), validated by that same parser; flags dynalign
owns are refused with the setting to use instead.
"""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from typing import Any

from shared.config import ModelConfig, ServingConfig
from shared.models import resolve_model_path

log = logging.getLogger(__name__)

# Engine flags dynalign sets itself, and why they cannot pass through.
OWNED_FLAGS = {
    "model": "use model.path (--model)",
    "served_model_name": "use model.served_name",
    "enable_lora": "every adapter version is served through vLLM's LoRA support, so it stays on",
    "lora_modules": "adapters come from the registry (dynalign adapters ...)",
    "host": "use serving.host (--host)",
    "port": "use serving.port (--port)",
    "api_key": "use serving.api_keys",
    "scheduling_policy": "the learner's rollouts run behind users' requests by priority",
    **{
        name: f"use model.{name}"
        for name in (
            "dtype",
            "max_model_len",
            "max_lora_rank",
            "max_loras",
            "enforce_eager",
            "gpu_memory_utilization",
            "seed",
        )
    },
}


class EngineArgsError(ValueError):
    """An engine flag vLLM does not accept, or one dynalign owns; the message names it."""


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# OpenMP settings of the learner's process (its in-process rollout engine and its torch): a
# thread per allowed core, and a short spin at barriers. libgomp reads them once, when torch
# loads it, so `dynalign learn` sets them before anything imports torch.
#
# Why: the learner's engine runs in-process (engine_kwargs), where vLLM's own thread binding (a
# worker process per engine, VLLM_CPU_OMP_THREADS_BIND) does not apply; libgomp's default spin
# (300k iterations) makes two engines sharing the cores wait on each other's spinning threads.
# Pinning (GOMP_CPU_AFFINITY) is left out: it pins the process's main thread to the first core.
# Measured on 2 cores (SmolLM2, 32 x 128 tokens each, bench/results/cpu_placement.json): two
# engines at once 69 + 68 tokens/s, 20 + 20 with libgomp's default spin.
#
# The serving engine (`dynalign serve`, `up`'s server) gets none of this: it runs with vLLM's
# own choices, so it is vLLM's server by construction on any machine. Inherited by the server's
# engine core (before issue 26), they cost it 7-12% of throughput on two cores, single rounds
# down to 0.74x vLLM's server (bench/results/serving-causes/).
LEARNER_SPINCOUNT = "10000"
CPU_KV_CACHE_BYTES = 2**30


def use_learner_threads() -> None:
    """The learner's OpenMP settings, where not set already."""
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    os.environ.setdefault("GOMP_SPINCOUNT", LEARNER_SPINCOUNT)


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
        # The learner's rollouts share the serving engine behind users' requests
        # (serving/rollout.py); users' requests keep vLLM's default priority, 0.
        scheduling_policy="priority",
    )
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        # vLLM's CPU backend takes its KV cache size from here (VLLM_CPU_KVCACHE_SPACE, where
        # set, over it); 1 GiB holds our loads. `--engine-arg kv_cache_memory_bytes=N` changes it.
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        # The model runs in the engine-core process (the learner's own, the server's one
        # child), not in a worker process of its own: vLLM's worker and engine core wait on
        # each other by spinning on shared memory (sched_yield, 1 s after each step), and on
        # a few cores a worker starting beside busy engines got ~3% of a core for minutes.
        # It also saves the worker's start (~15 s of the tiny model's ~30 s). vLLM's CPU
        # platform allows it only with VLLM_ENABLE_V1_MULTIPROCESSING=0.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs["distributed_executor_backend"] = "uni"
    return kwargs


def _flags(kwargs: dict[str, Any]) -> list[str]:
    args = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        else:
            args += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return args


def passthrough(cfg: ModelConfig) -> dict[str, Any]:
    """model.engine_args with names normalised (dashes or underscores), owned flags refused."""
    given = {key.replace("-", "_").lstrip("_"): value for key, value in cfg.engine_args.items()}
    for key in given:
        if key in OWNED_FLAGS and not (key == "enable_lora" and given[key] is True):
            raise EngineArgsError(f"engine arg '{key}' is set by dynalign: {OWNED_FLAGS[key]}")
    given.pop("enable_lora", None)
    return given


def vllm_cli_args(cfg: ModelConfig, serving: ServingConfig | None = None) -> list[str]:
    """Arguments for `vllm serve` (model first, without host/port) that match our engine."""
    kwargs = engine_kwargs(cfg)
    extra = passthrough(cfg)
    if serving is not None:
        # vLLM's own server-wide output cap: requests that set no max_tokens stop there too.
        override = dict(extra.get("override_generation_config") or {})
        override.setdefault("max_new_tokens", serving.max_tokens)
        extra["override_generation_config"] = override
    args = [kwargs.pop("model"), "--served-model-name", cfg.served_name, "--disable-log-stats"]
    return args + _flags(kwargs) + _flags(extra)


def parse_vllm_args(argv: list[str]) -> Namespace:
    """vLLM's own parser and checks; an error names the flag instead of exiting."""
    from shared.vllm_compat import (
        FlexibleArgumentParser,
        make_arg_parser,
        validate_parsed_serve_args,
    )

    class Parser(FlexibleArgumentParser):
        def error(self, message: str):
            raise EngineArgsError(f"vLLM engine arguments: {message}")

    parser = make_arg_parser(Parser(prog="dynalign"))
    args = parser.parse_args(["--model", argv[0], *argv[1:]])
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineArgsError(f"vLLM engine arguments: {exc}") from exc
    return args


def learner_engine_kwargs(cfg: ModelConfig, max_loras: int) -> dict:
    """`vllm.LLM(**kwargs)` for the learner: our engine settings plus the pass-through flags
    that configure the engine (typed by vLLM's parser; server-only flags do not apply)."""
    from dataclasses import fields

    from shared.vllm_compat import EngineArgs

    kwargs = engine_kwargs(cfg, max_loras=max_loras)
    extra = passthrough(cfg)
    if extra:
        parsed = parse_vllm_args([kwargs["model"], *_flags(extra)])
        engine_fields = {f.name for f in fields(EngineArgs)}
        for key in extra:
            if key in engine_fields:
                kwargs[key] = getattr(parsed, key)
            else:
                log.info("engine arg %s is a server flag; the learner's engine ignores it", key)
    return kwargs
