"""Learner checkpoints: adapter + optimiser state + the offsets trained on, written atomically.

    <learner_dir>/checkpoints/step-00000010/
        adapter/              PEFT files (adapter_config.json, adapter_model.safetensors)
        optimizer.pt          optimiser state
        state.json            CheckpointState

Order of a checkpoint (learner.loop): write this directory (temp + rename) → publish the candidate
version → commit the Kafka offsets. A crash anywhere in between is repaired on restart from the
newest checkpoint: the version is published if missing and the offsets committed again, so no
checkpoint is built twice from the same records and none is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from learner.consumer import TrainingPrompt
from shared.files import fsync_tree

STATE = "state.json"


class CheckpointState(BaseModel):
    step: int
    # Next offset to read per "topic:partition" (what gets committed) and the records trained on
    # since the previous checkpoint ("topic:partition" -> [first, last]).
    next_offsets: dict[str, int]
    trained_offsets: dict[str, list[int]] = Field(default_factory=dict)
    # Prompts read before next_offsets but not trained on yet (deferred by the share cap): the
    # committed offsets have moved past them, so this is where they survive a restart.
    deferred: list[TrainingPrompt] = Field(default_factory=list)
    parent_version: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"step-{self.step:08d}"


def save(root: Path, state: CheckpointState, model, optimizer) -> Path:
    root = Path(root) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / state.name
    if final.exists():  # written before a crash; identical content by construction
        return final
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        model.save_pretrained(staging / "adapter")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / STATE).write_text(state.model_dump_json(indent=2))
        fsync_tree(staging)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def latest(root: Path) -> tuple[Path, CheckpointState] | None:
    found = sorted((Path(root) / "checkpoints").glob("step-*"))
    if not found:
        return None
    return found[-1], CheckpointState.model_validate_json((found[-1] / STATE).read_text())


def restore(path: Path, model, optimizer) -> None:
    """Load adapter weights and optimiser state from a checkpoint into live objects."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def trained_ranges(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    """Offsets read between two positions: "topic:p" -> [first, last] (inclusive)."""
    return {
        key: [before.get(key, 0), end - 1] for key, end in after.items() if end > before.get(key, 0)
    }
