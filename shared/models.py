"""The base model as a local folder, from a hub id or a path, resolved once per process.

Every side reads the same files: vLLM loads the folder, the trainer and tokenizers load it
with transformers, and the registry fingerprints it (shared/registry.py). A hub id
(`Qwen/Qwen2.5-7B-Instruct`) is looked up in the Hugging Face cache first, through
huggingface_hub (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, as `vllm serve` and transformers
do): a cached snapshot is used as it is, offline or not, and only a model not in the cache is
downloaded, unless HF_HUB_OFFLINE is set; then the error says how to get it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from shared.config import ModelConfig

# What serving and training read: config, tokenizer, chat template, safetensors weights (a
# repository's .bin/.pth/.gguf copies of the same weights are left on the hub).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


class ModelNotFound(RuntimeError):
    pass


def resolve_model_path(cfg: ModelConfig) -> str:
    """model.path as a local folder; empty: the embedded SmolLM2-135M-Instruct."""
    if not cfg.path:
        from shared.assets import smollm2_dir

        return str(smollm2_dir())
    return local_model_dir(cfg.path)


@functools.cache
def local_model_dir(path_or_id: str) -> str:
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if local.is_absolute() or path_or_id.startswith((".", "~")) or path_or_id.count("/") != 1:
        raise ModelNotFound(f"model {path_or_id!r}: no such folder, and not a hub id (org/name)")
    return _hub_snapshot(path_or_id)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFound(
                f"model {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set: run `hf download "
                f"{repo_id}` where the hub is reachable, or pass a local folder"
            ) from None
    return snapshot_download(repo_id, allow_patterns=MODEL_FILES)
