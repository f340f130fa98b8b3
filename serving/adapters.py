"""Hot swap: keep the engine's loaded adapters and the alias table in step with the registry.

The registry's files are the truth; `dynalign.adapters` (compacted) announces changes so every
server replica reacts at once, and a periodic re-read of the files makes a replica converge even
when the topic is gone (the embedded broker keeps nothing across a restart).

A switch loads the new version under a new engine name first, then moves the alias in one
assignment: requests already running finish on the version they started with. The last
`keep_loaded` versions stay loaded for an instant rollback (pinned loads count too); older ones
are evicted once no request uses them.

A version is read once: its bytes are checked (checksums, config, NaN/Inf, base model) and those
same bytes are written to a private directory the engine loads from, so a file changed in the
shared store after the check can never reach the engine. A version that cannot be loaded leaves
the alias where it was and is retried with back-off (a shared volume may not show every file
yet); the problem is logged once per version.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from serving import metrics
from serving.aliases import AliasTable, CanarySplit
from shared.config import DynalignConfig
from shared.registry import Registry, RegistryState, verify_adapter

log = logging.getLogger(__name__)


class AdapterRefused(ValueError):
    """The version cannot be served; the message names the problem."""


class AdapterFollower:
    def __init__(
        self,
        cfg: DynalignConfig,
        registry: Registry,
        aliases: AliasTable,
        serving_models,
        fingerprint: str,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.aliases = aliases
        self.serving_models = serving_models  # vLLM's OpenAIServingModels
        self.fingerprint = fingerprint
        self.in_flight: Counter[int] = Counter()
        self.registry_state = RegistryState()  # as of the last sync (request-time checks)
        self.applied_revision = -1
        self._lock = asyncio.Lock()  # one sync at a time
        self._load_lock = asyncio.Lock()  # one load at a time: two first requests, one load
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._load_order: list[int] = []
        self._loaded_dir = Path(tempfile.mkdtemp(prefix="dynalign-adapters-"))
        # A refused target: (registry revision, when to retry it, back-off); a new revision
        # is tried at once.
        self._refused: tuple[int, float, float] | None = None
        self._reported: set[str] = set()

    # -- loading ------------------------------------------------------------------------------
    async def ensure_loaded(self, version: int) -> None:
        async with self._load_lock:
            if version in self.aliases.loaded:
                return
            await self._load(version)
        await self._evict()

    async def _load(self, version: int) -> None:
        from shared.vllm_compat import ErrorResponse, LoadLoRAAdapterRequest

        if version not in self.registry.versions():
            raise AdapterRefused(f"v{version} does not exist in the registry")
        verified = await asyncio.to_thread(
            verify_adapter,
            self.registry.path(version),
            self.fingerprint,
            self.cfg.model.max_lora_rank,
        )
        if verified.problems:
            for problem in verified.problems:
                metrics.ADAPTER_SWAP_FAILURES.labels(_reason(problem)).inc()
            raise AdapterRefused("; ".join(verified.problems))
        name = self.aliases.engine_name(version)
        private = await asyncio.to_thread(verified.materialize, self._loaded_dir / name)
        result = await self.serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(private))
        )
        if isinstance(result, ErrorResponse):
            metrics.ADAPTER_SWAP_FAILURES.labels("engine").inc()
            raise AdapterRefused(f"v{version}: the engine refused it: {result.error.message}")
        self.aliases.loaded.add(version)
        self._load_order.append(version)
        metrics.ADAPTERS_LOADED.set(len(self.aliases.loaded))
        log.info("loaded adapter v%d as %s", version, name)

    async def _evict(self) -> None:
        async with self._load_lock:
            await self._evict_unused()

    async def _evict_unused(self) -> None:
        # The newest load always stays: it was loaded for a request about to use it.
        keep = max(1, self.cfg.registry.keep_loaded)
        for version in list(self._load_order[:-keep]):
            canary = self.aliases.canary
            if (
                version == self.aliases.live_version
                or (canary and version == canary.version)
                or self.in_flight[version]
            ):
                continue
            name = self.aliases.engine_name(version)
            self.aliases.loaded.discard(version)  # stop resolving to it first
            await unload_adapter(self.serving_models, name)
            self._load_order.remove(version)
            shutil.rmtree(self._loaded_dir / name, ignore_errors=True)
            log.info("evicted adapter v%d", version)
        metrics.ADAPTERS_LOADED.set(len(self.aliases.loaded))

    # -- converging on the registry -----------------------------------------------------------
    async def sync(self) -> RegistryState:
        """Make the alias serve what the registry says is live (no-op when nothing changed).
        A version that cannot be served leaves the alias where it was."""
        async with self._lock:
            state = await asyncio.to_thread(self.registry.read_state)
            self.registry_state = state
            if state.revision == self.applied_revision:
                return state
            refused = self._refused
            if refused and refused[0] == state.revision and time.monotonic() < refused[1]:
                return state
            target = state.live
            if target != self.aliases.live_version:
                if target is not None:
                    try:
                        await self.ensure_loaded(target)
                    except AdapterRefused:
                        backoff = min(refused[2] * 2, 300.0) if refused else 1.0
                        self._refused = (state.revision, time.monotonic() + backoff, backoff)
                        raise
                self.aliases.live_version = target  # the switch: one assignment
                metrics.ADAPTER_SWAPS.inc()
                metrics.LIVE_ADAPTER_VERSION.set(target or 0)
                log.info(
                    "alias %s -> %s",
                    self.aliases.served_name,
                    "base" if target is None else f"v{target}",
                )
                await self._evict()
            await self._follow_canary(state)
            self.applied_revision = state.revision
            self._refused = None
            return state

    async def _follow_canary(self, state: RegistryState) -> None:
        """Split the main alias as the registry's canary says; its version is loaded first."""
        canary = state.canary
        if canary is None or canary.against != self.aliases.live_version:
            self.aliases.canary = None  # none, or live moved under it: the split is off
        else:
            await self.ensure_loaded(canary.version)
            self.aliases.canary = CanarySplit(canary.version, canary.share)
        metrics.CANARY_VERSION.set(canary.version if self.aliases.canary else 0)
        metrics.CANARY_SHARE.set(canary.share if self.aliases.canary else 0)

    async def run(self, poll_s: float = 1.0) -> None:
        """Follow the registry: wake on a topic message, re-read the files every `poll_s`.
        A refused target is retried with back-off (1 s doubling to 5 min), logged once."""
        while True:
            try:
                await self.sync()
            except AdapterRefused as exc:
                if str(exc) not in self._reported:
                    self._reported.add(str(exc))
                    log.error("not switching: %s (retrying with back-off)", exc)
            except Exception:
                log.exception("adapter sync failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    def watch_topic(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        """A thread that turns every message on the control topic into a wake-up."""
        from shared.kafka import consumer

        def watch() -> None:
            while not self._stop.is_set():
                try:
                    c = consumer(
                        self.cfg.kafka.bootstrap, group_id=None, auto_offset_reset="latest"
                    )
                    c.subscribe([self.cfg.kafka.adapters_topic])
                    while not self._stop.is_set():
                        if c.poll(timeout_ms=500):
                            loop.call_soon_threadsafe(self._wake.set)
                except Exception as exc:  # broker away: the file poll keeps us converging
                    log.debug("control topic unavailable (%s)", exc)
                    self._stop.wait(2.0)

        thread = threading.Thread(target=watch, name="adapters-topic", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        shutil.rmtree(self._loaded_dir, ignore_errors=True)


async def unload_adapter(serving_models, name: str) -> None:
    """Unload `name` from vLLM's serving layer and its engine: vLLM's unload only forgets the
    name, the engine keeps the weights until removed."""
    from shared.vllm_compat import UnloadLoRAAdapterRequest

    lora_id = serving_models.lora_requests[name].lora_int_id
    await serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    await serving_models.engine_client.remove_lora(lora_id)


def _reason(problem: str) -> str:
    for key in ("corrupt", "NaN", "rank", "base"):
        if key in problem:
            return key.lower()
    return "other"
