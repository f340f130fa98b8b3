"""The adapter store: every adapter version is an immutable directory `<store>/v<N>/` holding PEFT
files (loadable by `vllm --lora-modules`) and `manifest.json`.

A version is written to a temporary directory and renamed into place, so readers never see half
a version, and the rename is what allocates N (two writers cannot both create `v7`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.schemas import utc_now

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"

AdapterState = Literal["candidate", "live", "rejected", "retired"]


class Manifest(BaseModel):
    version: int
    parent_version: int | None
    base_model: str
    created_at: datetime = Field(default_factory=utc_now)
    weights_sha256: str
    # Which learner checkpoint produced it: a restarted learner finds its version by this
    # instead of publishing the same checkpoint twice.
    source_checkpoint: str
    trained_offsets: dict[str, list[int]] = Field(default_factory=dict)  # "topic:p" -> [first, last]
    steps: int
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*")
                      if p.name[1:].isdigit() and (p / MANIFEST).exists())

    def manifest(self, version: int) -> Manifest:
        return Manifest.model_validate_json((self.path(version) / MANIFEST).read_text())

    def find_by_checkpoint(self, checkpoint: str) -> int | None:
        for version in self.versions():
            if self.manifest(version).source_checkpoint == checkpoint:
                return version
        return None

    def publish(self, adapter_dir: Path, **fields: Any) -> Manifest:
        """Copy a PEFT adapter directory in as the next version; returns its manifest."""
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            for item in Path(adapter_dir).iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
            sha = file_sha256(staging / WEIGHTS)
            while True:
                version = max(self.versions(), default=0) + 1
                manifest = Manifest(version=version, weights_sha256=sha, **fields)
                (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
                _fsync_tree(staging)
                try:
                    os.rename(staging, self.path(version))  # fails if vN exists: take the next N
                except OSError:
                    if self.path(version).exists():
                        continue
                    raise
                return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)
