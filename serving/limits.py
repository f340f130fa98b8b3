"""Per-client limits, so one client cannot starve the others: requests in flight per client, a
token-bucket rate per client, and a bound on all requests in flight (the engine's queue).

Refusals are 429 with Retry-After, as OpenAI answers rate limits, so SDK clients back off on
their own. All state lives on the event loop's thread: no locks needed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from serving import metrics


class LimitExceeded(Exception):
    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason  # metric label: capacity | concurrency | rate
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Permit:
    """Held while a request runs (for streams: until the last chunk); release() is idempotent."""

    limits: ClientLimits
    client: str
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits._release(self.client)


class ClientLimits:
    def __init__(
        self, max_concurrent: int, rate_per_s: float, burst: int, max_in_flight: int
    ) -> None:
        self.max_concurrent = max_concurrent
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_in_flight = max_in_flight
        self._running: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self.idle = asyncio.Event()  # set while no request is in flight
        self.idle.set()

    @property
    def in_flight(self) -> int:
        return sum(self._running.values())

    def admit(self, client: str) -> Permit:
        if self.in_flight >= self.max_in_flight:
            raise self._refuse(
                "capacity",
                f"The server is at capacity ({self.max_in_flight} "
                "requests in flight); retry shortly.",
                1,
            )
        if self._running[client] >= self.max_concurrent:
            raise self._refuse(
                "concurrency",
                f"Too many concurrent requests from this client (limit {self.max_concurrent}).",
                1,
            )
        now = time.monotonic()
        bucket = self._buckets.get(client) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self.rate_per_s)
            raise self._refuse(
                "rate",
                f"Rate limit reached for this client ({self.rate_per_s:g} requests/s).",
                wait,
            )
        bucket.tokens -= 1
        self._buckets[client] = bucket
        self._running[client] += 1
        self.idle.clear()
        if len(self._buckets) > 10_000:
            self._forget_idle(now)
        return Permit(self, client)

    def _release(self, client: str) -> None:
        self._running[client] -= 1
        if self._running[client] <= 0:
            del self._running[client]
        if not self._running:
            self.idle.set()

    def _forget_idle(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket: drop those (bounded memory
        when clients are addresses)."""
        full_after_s = self.burst / self.rate_per_s
        for client in [c for c, b in self._buckets.items() if now - b.updated >= full_after_s]:
            del self._buckets[client]

    @staticmethod
    def _refuse(reason: str, message: str, retry_after_s: int) -> LimitExceeded:
        metrics.REQUESTS_LIMITED.labels(reason).inc()
        return LimitExceeded(reason, message, retry_after_s)
