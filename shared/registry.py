"""The adapter registry: versions, their states, the movable alias `live`, and an audit log.

    <store>/v<N>/           immutable: PEFT files (`vllm --lora-modules` loads them), manifest.json
    <store>/registry.json   mutable state: state of each version, the `live` alias, pin, pause
    <store>/audit.jsonl     append-only: who moved what, when, from, to, why

A version is written to a temporary directory and renamed into place, so readers never see half
a version, and the rename is what allocates N (two writers cannot both create `v7`). The mutable
state changes under an exclusive file lock: the audit line is written (and fsynced) first, then
the state file is replaced durably, so the audit log is a journal the state can be rebuilt from
if registry.json is ever lost or garbled. These files are the truth; the Kafka topic
`dynalign.adapters` only announces changes (see serving/adapters.py).
States: candidate -> live | rejected; live -> retired when another version goes live. Which
changes are allowed is decided in shared/lifecycle.py; this module only stores them.
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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field

from shared.files import atomic_write, file_sha256, fsync_tree
from shared.gate_result import GateResult
from shared.schemas import utc_now

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

# inconclusive: the gate could not tell whether the candidate is worse (gate.on_inconclusive
# = hold); it waits for an operator's promote or reject. canary: it serves a share of the main
# alias's users beside live until the canary rule (shared/canary.py) or an operator decides.
AdapterState = Literal["candidate", "inconclusive", "canary", "live", "rejected", "retired"]


class Manifest(BaseModel):
    version: int
    parent_version: int | None
    base_model: str
    base_fingerprint: str  # shared.registry.base_fingerprint of the model it was trained on
    created_at: datetime = Field(default_factory=utc_now)
    weights_sha256: str
    # sha256 of every file of the version but the manifest (adapter_config.json included: its
    # lora_alpha scales the weights as much as the weights themselves).
    files_sha256: dict[str, str] = Field(default_factory=dict)
    # Which learner run and step produced it ("<run id>/step-N"): a restarted learner finds
    # its version by this instead of publishing the same checkpoint twice, and a new run (a
    # fresh workdir) never matches an old run's versions.
    lineage: str = Field(validation_alias=AliasChoices("lineage", "source_checkpoint"))
    trained_offsets: dict[str, list[int]] = Field(
        default_factory=dict
    )  # "topic:p" -> [first, last]
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


# Largest LoRA scaling (lora_alpha / r) a served adapter may ask for; PEFT's defaults give 1-2,
# and 1e9 turns any weights into garbage.
MAX_LORA_SCALING = 64.0


@dataclass
class VerifiedAdapter:
    """A version's files as read once: checked, and the bytes to load (never re-read from the
    store, which could change between the check and the load)."""

    version_dir: Path
    files: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def materialize(self, directory: Path) -> Path:
        """Write the verified bytes to a private directory for the engine to load."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)
        return directory


def verify_adapter(path: Path, fingerprint: str, max_rank: int) -> VerifiedAdapter:
    """Read a version once and say why it must not be served (no problems = fine): unreadable or
    corrupt files, checksums that do not match the manifest (the config included), an
    adapter_config the engine should not trust (rank above its max_lora_rank, an extreme
    scaling), NaN/Inf weights, or another base model."""
    path = Path(path)
    name = path.name
    verified = VerifiedAdapter(path)
    problems = verified.problems
    try:
        manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
        files = {
            p.name: p.read_bytes()
            for p in sorted(path.iterdir())
            if p.is_file() and p.name != MANIFEST
        }
    except (OSError, ValueError) as exc:
        problems.append(f"{name}: corrupt: cannot read the manifest or files ({exc})")
        return verified
    if manifest.base_fingerprint != fingerprint:
        problems.append(
            f"{name}: trained on another base model ({manifest.base_model}, "
            f"fingerprint {manifest.base_fingerprint[:12]} != served "
            f"{fingerprint[:12]})"
        )
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            problems.append(f"{name}: corrupt: {required} is missing")
    if problems:
        return verified
    expected = {**manifest.files_sha256, WEIGHTS: manifest.weights_sha256}
    if CONFIG not in expected:
        problems.append(f"{name}: corrupt: the manifest has no checksum for {CONFIG}")
    for file_name, sha in expected.items():
        if file_name not in files or hashlib.sha256(files[file_name]).hexdigest() != sha:
            problems.append(f"{name}: corrupt: {file_name} sha256 does not match the manifest")
    if problems:
        return verified
    problems.extend(_content_problems(name, files, max_rank))
    verified.files = {} if problems else {n: files[n] for n in expected}
    return verified


def verify_working_adapter(path: Path, max_rank: int) -> VerifiedAdapter:
    """A learner's working adapter (a PEFT directory, no manifest: it is no version), checked
    as a version's files are, except for checksums and base model."""
    path = Path(path)
    verified = VerifiedAdapter(path)
    try:
        files = {n: (path / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    except OSError as exc:
        verified.problems.append(f"{path.name}: cannot read the adapter ({exc})")
        return verified
    verified.problems.extend(_content_problems(path.name, files, max_rank))
    verified.files = {} if verified.problems else files
    return verified


def _content_problems(name: str, files: dict[str, bytes], max_rank: int) -> list[str]:
    """What the engine should not load: a config it should not trust, unreadable or non-finite
    weights."""
    import torch
    from safetensors.torch import load as load_safetensors

    problems = _config_problems(name, files[CONFIG], max_rank)
    try:
        tensors = load_safetensors(files[WEIGHTS])
    except Exception as exc:  # truncated or garbage safetensors
        return [*problems, f"{name}: corrupt: cannot read weights ({exc})"]
    bad = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        problems.append(f"{name}: weights contain NaN/Inf ({len(bad)} tensors, e.g. {bad[0]})")
    return problems


def _config_problems(name: str, raw: bytes, max_rank: int) -> list[str]:
    try:
        config = json.loads(raw)
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", rank))
    except (ValueError, TypeError, AttributeError) as exc:
        return [f"{name}: corrupt: {CONFIG} is not a LoRA config ({exc})"]
    problems = []
    if rank > max_rank:
        problems.append(f"{name}: LoRA rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    if rank < 1:
        problems.append(f"{name}: LoRA rank {rank} is not positive")
    elif not (0 < alpha / rank <= MAX_LORA_SCALING):  # NaN fails this too
        problems.append(
            f"{name}: LoRA scaling lora_alpha/r = {alpha:g}/{rank} is outside "
            f"(0, {MAX_LORA_SCALING:g}]"
        )
    return problems


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[int]:
        return sorted(
            int(p.name[1:])
            for p in self.root.glob("v*")
            if p.name[1:].isdigit() and (p / MANIFEST).exists()
        )

    def manifest(self, version: int) -> Manifest:
        return Manifest.model_validate_json((self.path(version) / MANIFEST).read_text())

    def find_by_lineage(self, lineage: str) -> int | None:
        for version in self.versions():
            if self.manifest(version).lineage == lineage:
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
            files_sha = {p.name: file_sha256(p) for p in staging.iterdir() if p.is_file()}
            while True:
                version = max(self.versions(), default=0) + 1
                manifest = Manifest(
                    version=version, weights_sha256=sha, files_sha256=files_sha, **fields
                )
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
class Canary(BaseModel):
    """A version serving `share` of the main alias's users beside `live` (`against`), the same
    users on every replica (serving/aliases.py). Its decision rule's settings are fixed here
    when it starts, so every reader judges it alike."""

    version: int
    against: int | None  # the live version it is compared with (None = base)
    share: float = Field(gt=0, lt=1)
    started_at: datetime
    min_ratings: int  # per arm, before the rule may promote
    max_ratings: int  # per arm: the horizon; an operator may extend it
    margin: float  # how much worse (share of negative ratings) still counts as not worse


class RegistryState(BaseModel):
    states: dict[int, AdapterState] = Field(default_factory=dict)
    gate_results: dict[int, GateResult] = Field(default_factory=dict)
    live: int | None = None
    canary: Canary | None = None
    pinned: bool = False  # pinned: nothing moves `live` automatically (the gate only proposes)
    learning_paused: bool = False
    revision: int = 0  # the number of audit entries applied; followers compare it

    def gate_json(self, version: int) -> dict[str, Any] | None:
        """`version`'s gate result as operators read it (JSON), None when it has none."""
        gate = self.gate_results.get(version)
        return gate.model_dump(mode="json") if gate else None


class AuditEntry(BaseModel):
    at: datetime = Field(default_factory=utc_now)
    actor: str
    action: str
    from_version: int | None = None
    to_version: int | None = None
    reason: str = ""
    gate: GateResult | None = None  # for gate verdicts
    # canary-start: the Canary's fields; canary-extend: {"max_ratings": N}; a canary's decision:
    # the evidence (shared/canary.py)
    canary: dict[str, Any] | None = None


class RegistryError(ValueError):
    """An operator action that cannot be done; the message says why."""


def apply_entry(state: RegistryState, entry: AuditEntry) -> None:
    """The one place the registry state changes: every transaction applies its audit entry
    here, and a rebuild from the audit log replays them all, so the two cannot disagree."""
    if entry.gate is not None and entry.to_version is not None:
        state.gate_results[entry.to_version] = entry.gate
    if entry.action in ("promote", "promote-override", "rollback"):
        if state.live is not None:
            state.states[state.live] = "retired"
        if state.canary is not None and state.canary.version != entry.to_version:
            # live moved under a running canary: its comparison no longer holds
            state.states[state.canary.version] = "candidate"
        state.canary = None
        if entry.to_version is not None:
            state.states[entry.to_version] = "live"
        state.live = entry.to_version
    elif entry.action == "canary-start":
        state.canary = Canary(**entry.canary, started_at=entry.at)
        state.states[entry.to_version] = "canary"
    elif entry.action == "canary-extend":
        state.canary = state.canary.model_copy(update=entry.canary)
    elif entry.action == "canary-stop":
        state.states[entry.to_version] = "candidate"
        state.canary = None
    elif entry.action == "reject":
        state.states[entry.to_version] = "rejected"
        if state.canary is not None and state.canary.version == entry.to_version:
            state.canary = None
    elif entry.action == "hold-inconclusive":
        state.states[entry.to_version] = "inconclusive"
        if state.canary is not None and state.canary.version == entry.to_version:
            state.canary = None
    elif entry.action in ("pin", "unpin"):
        state.pinned = entry.action == "pin"
    elif entry.action in ("pause-learning", "resume-learning"):
        state.learning_paused = entry.action == "pause-learning"
    state.revision += 1


class Registry(AdapterStore):
    STATE_FILE = "registry.json"
    AUDIT_FILE = "audit.jsonl"

    def read_state(self) -> RegistryState:
        """The current state; rebuilt from the audit log when registry.json is missing or
        cannot be read (named in the log; `recover()` rewrites it)."""
        path = self.root / self.STATE_FILE
        try:
            return RegistryState.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return self._replay(self.audit_log())
        except ValueError as exc:
            log.error(
                "%s cannot be read (%s); using the state rebuilt from %s",
                path,
                str(exc).splitlines()[0],
                self.AUDIT_FILE,
            )
            return self._replay(self.audit_log())

    def state_of(self, version: int) -> AdapterState:
        return self.read_state().states.get(version, "candidate")

    def audit_log(self) -> list[AuditEntry]:
        path = self.root / self.AUDIT_FILE
        if not path.exists():
            return []
        entries = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(AuditEntry.model_validate_json(line))
            except ValueError:  # a torn last line after a crash, or damage: skipped, named
                log.error("%s line %d cannot be read; skipped", path, number)
        return entries

    @staticmethod
    def _replay(entries: list[AuditEntry], state: RegistryState | None = None) -> RegistryState:
        state = state or RegistryState()
        for entry in entries:
            apply_entry(state, entry)
        return state

    def _reconciled(self) -> RegistryState:
        """Under the lock: the state with any audited change a crash kept out of registry.json
        (the audit line is written first) applied."""
        state = self.read_state()
        entries = self.audit_log()
        return self._replay(entries[state.revision :], state)

    def recover(self) -> RegistryState:
        """At start-up: rewrite registry.json from the audit log if it is behind it, missing or
        garbled (the garbled file is kept beside it for inspection)."""
        with self.lock():
            path = self.root / self.STATE_FILE
            state = self._reconciled()
            try:
                on_disk = RegistryState.model_validate_json(path.read_bytes())
            except FileNotFoundError:
                on_disk = None
            except ValueError:
                on_disk = None
                kept = path.with_name(f"{self.STATE_FILE}.corrupt-{utc_now():%Y%m%dT%H%M%S}")
                os.replace(path, kept)
                log.error(
                    "%s was garbled: kept as %s, rebuilt from %s (revision %d)",
                    path,
                    kept.name,
                    self.AUDIT_FILE,
                    state.revision,
                )
            if on_disk != state and (on_disk is not None or state.revision):
                atomic_write(path, state.model_dump_json(indent=2).encode())
            return state

    @contextlib.contextmanager
    def lock(self):
        """Exclusive across processes sharing the store."""
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def transact(self, decide) -> tuple[RegistryState, AuditEntry]:
        """One transaction: under the lock, `decide(state)` checks the current state and returns
        the audit entry (or raises RegistryError); the entry is made durable first, then applied
        and the state file replaced durably. shared/lifecycle.py decides; this only stores."""
        with self.lock():
            state = self._reconciled()
            entry = decide(state)
            with (self.root / self.AUDIT_FILE).open("a") as audit:
                audit.write(entry.model_dump_json() + "\n")
                audit.flush()
                os.fsync(audit.fileno())
            apply_entry(state, entry)
            atomic_write(self.root / self.STATE_FILE, state.model_dump_json(indent=2).encode())
            return state, entry
