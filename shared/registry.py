"""The adapter registry: versions, their states, the movable alias `live`, and an audit log.

    <store>/v<N>/           immutable: PEFT files (loadable by `vllm --lora-modules`) + manifest.json
    <store>/registry.json   mutable state: state of each version, the `live` alias, pin, pause
    <store>/audit.jsonl     append-only: who moved what, when, from, to, why

A version is written to a temporary directory and renamed into place, so readers never see half
a version, and the rename is what allocates N (two writers cannot both create `v7`). The mutable
state changes under an exclusive file lock and is replaced atomically. These files are the
truth; the Kafka topic `dynalign.adapters` only announces changes (see serving/adapters.py).
States: candidate -> live | rejected; live -> retired when another version goes live.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.files import file_sha256, fsync_tree
from shared.schemas import utc_now

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"

AdapterState = Literal["candidate", "live", "rejected", "retired"]


class Manifest(BaseModel):
    version: int
    parent_version: int | None
    base_model: str
    base_fingerprint: str  # shared.registry.base_fingerprint of the model it was trained on
    created_at: datetime = Field(default_factory=utc_now)
    weights_sha256: str
    # Which learner checkpoint produced it: a restarted learner finds its version by this
    # instead of publishing the same checkpoint twice.
    source_checkpoint: str
    trained_offsets: dict[str, list[int]] = Field(default_factory=dict)  # "topic:p" -> [first, last]
    steps: int
    metrics: dict[str, float] = Field(default_factory=dict)


def base_fingerprint(model_dir: str | Path) -> str:
    """Identifies a base model's weights cheaply: config.json plus, per weights file, its size
    and its first and last MiB. Hashing whole checkpoints (tens of GB) at every server start
    would be slow, and a different base differs in these bytes in practice."""
    root = Path(model_dir)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def adapter_problems(path: Path, fingerprint: str, max_rank: int) -> list[str]:
    """Why a version must not be served (empty list = fine): corrupt files, a checksum that does
    not match its manifest, NaN/Inf weights, a rank above the engine's limit, another base."""
    import torch
    from safetensors.torch import load_file

    name = Path(path).name
    try:
        manifest = Manifest.model_validate_json((Path(path) / MANIFEST).read_text())
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{name}: corrupt: cannot read manifest/adapter_config ({exc})"]
    problems = []
    if manifest.base_fingerprint != fingerprint:
        problems.append(f"{name}: trained on another base model ({manifest.base_model}, "
                        f"fingerprint {manifest.base_fingerprint[:12]} != served "
                        f"{fingerprint[:12]})")
    rank = int(config.get("r", 0))
    if rank > max_rank:
        problems.append(f"{name}: LoRA rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    weights = Path(path) / WEIGHTS
    try:
        if file_sha256(weights) != manifest.weights_sha256:
            return problems + [f"{name}: corrupt: weights sha256 does not match the manifest"]
        tensors = load_file(str(weights))
    except Exception as exc:  # truncated or garbage safetensors
        return problems + [f"{name}: corrupt: cannot read weights ({exc})"]
    bad = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        problems.append(f"{name}: weights contain NaN/Inf ({len(bad)} tensors, e.g. {bad[0]})")
    return problems


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
                fsync_tree(staging)
                try:
                    os.rename(staging, self.path(version))  # fails if vN exists: take the next N
                except OSError:
                    if self.path(version).exists():
                        continue
                    raise
                return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# -- lifecycle ------------------------------------------------------------------------------------
class RegistryState(BaseModel):
    states: dict[int, AdapterState] = Field(default_factory=dict)
    gate_results: dict[int, dict[str, Any]] = Field(default_factory=dict)
    live: int | None = None
    pinned: bool = False  # pinned: nothing moves `live` automatically (the gate only proposes)
    learning_paused: bool = False
    revision: int = 0  # bumps on every change; followers compare it


class AuditEntry(BaseModel):
    at: datetime = Field(default_factory=utc_now)
    actor: str
    action: str
    from_version: int | None = None
    to_version: int | None = None
    reason: str = ""


class RegistryError(ValueError):
    """An operator action that cannot be done; the message says why."""


class Registry(AdapterStore):
    STATE_FILE = "registry.json"
    AUDIT_FILE = "audit.jsonl"

    def read_state(self) -> RegistryState:
        try:
            return RegistryState.model_validate_json((self.root / self.STATE_FILE).read_text())
        except FileNotFoundError:
            return RegistryState()

    def state_of(self, version: int) -> AdapterState:
        return self.read_state().states.get(version, "candidate")

    def audit_log(self) -> list[AuditEntry]:
        path = self.root / self.AUDIT_FILE
        if not path.exists():
            return []
        return [AuditEntry.model_validate_json(line) for line in path.read_text().splitlines()
                if line.strip()]

    @contextlib.contextmanager
    def _transaction(self):
        """Exclusive across processes sharing the store; the new state replaces the old
        atomically, and the audit line is written before the lock is released."""
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read_state()
            entries: list[AuditEntry] = []
            yield state, entries
            state.revision += 1
            tmp = self.root / (self.STATE_FILE + ".tmp")
            tmp.write_text(state.model_dump_json(indent=2))
            os.replace(tmp, self.root / self.STATE_FILE)
            with (self.root / self.AUDIT_FILE).open("a") as audit:
                for entry in entries:
                    audit.write(entry.model_dump_json() + "\n")
                audit.flush()
                os.fsync(audit.fileno())

    def _require(self, version: int) -> None:
        if version not in self.versions():
            raise RegistryError(f"v{version} does not exist (versions: {self.versions()})")

    def promote(self, version: int, actor: str, reason: str = "") -> RegistryState:
        self._require(version)
        if self.read_state().states.get(version) == "rejected":
            raise RegistryError(f"v{version} was rejected by the gate; "
                                "re-run the gate or publish a new version")
        return self._move_live(version, actor, "promote", reason)

    def rollback(self, actor: str, to: int | None = None, reason: str = "") -> RegistryState:
        """Back to `to`, or to what was live when the current version was promoted (maybe the
        base model): repeated rollbacks walk back the chain of promotions."""
        if to is None:
            current = self.read_state().live
            moves = [e for e in self.audit_log() if e.action == "promote"
                     and e.to_version == current]
            if current is None or not moves:
                raise RegistryError("nothing to roll back to: no earlier live version")
            to = moves[-1].from_version
        else:
            self._require(to)
        return self._move_live(to, actor, "rollback", reason)

    def _move_live(self, to: int | None, actor: str, action: str, reason: str) -> RegistryState:
        with self._transaction() as (state, audit):
            previous = state.live
            if previous == to:
                raise RegistryError(f"{'base' if to is None else f'v{to}'} is already live")
            if previous is not None:
                state.states[previous] = "retired"
            if to is not None:
                state.states[to] = "live"
            state.live = to
            audit.append(AuditEntry(actor=actor, action=action, from_version=previous,
                                    to_version=to, reason=reason))
        return self.read_state()

    def reject(self, version: int, actor: str, reason: str) -> RegistryState:
        self._require(version)
        with self._transaction() as (state, audit):
            if state.live == version:
                raise RegistryError(f"v{version} is live; roll back first")
            state.states[version] = "rejected"
            audit.append(AuditEntry(actor=actor, action="reject", to_version=version,
                                    reason=reason))
        return self.read_state()

    def apply_gate(self, version: int, result: dict[str, Any], auto_promote: bool,
                   actor: str = "gate") -> tuple[RegistryState, str]:
        """Record the gate's result; reject a failing version, promote a passing one unless
        pinned or auto-promotion is off. Returns the new state and what was done."""
        with self._transaction() as (state, audit):
            state.gate_results[version] = result
            previous = state.live
            if not result["passed"]:
                state.states[version] = "rejected"
                action, reason = "reject", "; ".join(result["reasons"])
            elif auto_promote and not state.pinned and previous != version:
                if previous is not None:
                    state.states[previous] = "retired"
                state.states[version] = "live"
                state.live = version
                action, reason = "promote", "gate passed"
            else:
                action = "await-operator"
                reason = "gate passed; " + ("live is pinned" if state.pinned else
                                            "auto_promote is off")
            audit.append(AuditEntry(actor=actor, action=action, from_version=previous,
                                    to_version=version, reason=reason))
        return self.read_state(), action

    def set_flag(self, flag: Literal["pinned", "learning_paused"], value: bool, actor: str,
                 reason: str = "") -> RegistryState:
        action = {("pinned", True): "pin", ("pinned", False): "unpin",
                  ("learning_paused", True): "pause-learning",
                  ("learning_paused", False): "resume-learning"}[(flag, value)]
        with self._transaction() as (state, audit):
            setattr(state, flag, value)
            audit.append(AuditEntry(actor=actor, action=action, from_version=state.live,
                                    to_version=state.live, reason=reason))
        return self.read_state()


def announce(cfg, state: RegistryState, actor: str, action: str) -> None:
    """Tell every replica at once (best effort: replicas also poll the registry files)."""
    from shared.kafka import producer

    try:
        p = producer(cfg.kafka.bootstrap, max_block_ms=3000)
        p.send(cfg.kafka.adapters_topic, key=b"alias:live",
               value=json.dumps({"live": state.live, "revision": state.revision,
                                 "actor": actor, "action": action}).encode()).get(timeout=5)
        p.close(timeout=2)
    except Exception as exc:
        log.warning("could not announce on %s (%s); replicas will see it on their next poll",
                    cfg.kafka.adapters_topic, exc)
