"""Hot swap: keep the engine's loaded adapters and the alias table in step with the registry.

The registry's files are the truth; `dynalign.adapters` (compacted) announces changes so every
server replica reacts at once, and a periodic re-read of the files makes a replica converge even
when the topic is gone (the embedded broker keeps nothing across a restart).

A switch loads the new version under a new engine name first, then moves the alias in one
assignment: requests already running finish on the version they started with. The last
`keep_loaded` versions stay loaded for an instant rollback; older ones are evicted once no
request uses them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter

from serving import metrics
from serving.aliases import AliasTable
from shared.config import DynalignConfig
from shared.registry import Registry, RegistryState, adapter_problems

log = logging.getLogger(__name__)


class AdapterRefused(ValueError):
    """The version cannot be served; the message names the problem."""


class AdapterFollower:
    def __init__(self, cfg: DynalignConfig, registry: Registry, aliases: AliasTable,
                 serving_models, fingerprint: str) -> None:
        self.cfg = cfg
        self.registry = registry
        self.aliases = aliases
        self.serving_models = serving_models  # vLLM's OpenAIServingModels
        self.fingerprint = fingerprint
        self.in_flight: Counter[int] = Counter()
        self.applied_revision = -1
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._load_order: list[int] = []

    # -- loading ------------------------------------------------------------------------------
    async def ensure_loaded(self, version: int) -> None:
        if version in self.aliases.loaded:
            return
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        path = self.registry.path(version)
        if version not in self.registry.versions():
            raise AdapterRefused(f"v{version} does not exist in the registry")
        problems = await asyncio.to_thread(
            adapter_problems, path, self.fingerprint, self.cfg.model.max_lora_rank)
        if problems:
            for problem in problems:
                metrics.ADAPTER_SWAP_FAILURES.labels(_reason(problem)).inc()
            raise AdapterRefused("; ".join(problems))
        result = await self.serving_models.load_lora_adapter(LoadLoRAAdapterRequest(
            lora_name=self.aliases.engine_name(version), lora_path=str(path)))
        if isinstance(result, ErrorResponse):
            metrics.ADAPTER_SWAP_FAILURES.labels("engine").inc()
            raise AdapterRefused(f"v{version}: the engine refused it: {result.error.message}")
        self.aliases.loaded.add(version)
        self._load_order.append(version)
        metrics.ADAPTERS_LOADED.set(len(self.aliases.loaded))
        log.info("loaded adapter v%d as %s", version, self.aliases.engine_name(version))

    async def _evict(self) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        keep = self.cfg.registry.keep_loaded
        for version in list(self._load_order[:-keep] if keep else self._load_order):
            if version == self.aliases.live_version or self.in_flight[version]:
                continue
            name = self.aliases.engine_name(version)
            lora_id = self.serving_models.lora_requests[name].lora_int_id
            self.aliases.loaded.discard(version)  # stop resolving to it first
            # vLLM's unload only forgets the name; the engine keeps the weights until removed.
            await self.serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            await self.serving_models.engine_client.remove_lora(lora_id)
            self._load_order.remove(version)
            log.info("evicted adapter v%d", version)
        metrics.ADAPTERS_LOADED.set(len(self.aliases.loaded))

    # -- converging on the registry -----------------------------------------------------------
    async def sync(self) -> RegistryState:
        """Make the alias serve what the registry says is live (no-op when nothing changed).
        A version that cannot be served leaves the alias where it was."""
        async with self._lock:
            state = await asyncio.to_thread(self.registry.read_state)
            if state.revision == self.applied_revision:
                return state
            target = state.live
            if target != self.aliases.live_version:
                if target is not None:
                    await self.ensure_loaded(target)
                self.aliases.live_version = target  # the switch: one assignment
                metrics.ADAPTER_SWAPS.inc()
                metrics.LIVE_ADAPTER_VERSION.set(target or 0)
                log.info("alias %s -> %s", self.aliases.served_name,
                         "base" if target is None else f"v{target}")
                await self._evict()
            self.applied_revision = state.revision
            return state

    async def run(self, poll_s: float = 1.0) -> None:
        """Follow the registry: wake on a topic message, re-read the files every `poll_s`."""
        while True:
            try:
                await self.sync()
            except AdapterRefused as exc:
                log.error("not switching: %s", exc)
                self.applied_revision = self.registry.read_state().revision  # don't retry-loop
            except Exception:
                log.exception("adapter sync failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def watch_topic(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        """A thread that turns every message on the control topic into a wake-up."""
        from shared.kafka import consumer

        def watch() -> None:
            while not self._stop.is_set():
                try:
                    c = consumer(self.cfg.kafka.bootstrap, group_id=None,
                                 auto_offset_reset="latest")
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


def _reason(problem: str) -> str:
    for key in ("corrupt", "NaN", "rank", "base"):
        if key in problem:
            return key.lower()
    return "other"
