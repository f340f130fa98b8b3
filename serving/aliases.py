"""Model names clients use, and the engine adapter each one resolves to.

    "<served>"        the live adapter (the base model until one is live); while a canary runs,
                      its share of users gets the canary version instead, the same users on
                      every replica (a hash of the user's pseudonym and the canary version)
    "<served>@base"   the base model
    "<served>@vN"     adapter version N, pinned (also accepted as "<served>-vN", the name
                      responses carry, so a client can echo it back)

Engine adapter names are "<served>-v<N>" and are never reused for other weights: vLLM keys its
prefix cache by adapter name, so reloading changed weights under an old name would serve stale
cache blocks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True)
class CanarySplit:
    version: int
    share: float

    def takes(self, user: str) -> bool:
        """Sticky: a user's place in [0, 1) depends only on them and the canary version, so
        their conversation stays on one version and every replica agrees."""
        digest = hashlib.sha256(f"{self.version}\0{user}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.share


@dataclass(frozen=True)
class Route:
    alias: str  # what the client asked for
    engine_model: str  # what vLLM's serving layer is given ("<served>" = base)
    adapter_version: int | None  # None = base


class AliasTable:
    """Resolution is a dict lookup on the request path; moves replace the live version
    atomically (one attribute assignment), so in-flight requests keep the route they got."""

    def __init__(self, served_name: str) -> None:
        self.served_name = served_name
        self.live_version: int | None = None
        self.canary: CanarySplit | None = None  # set once its version is loaded
        self.loaded: set[int] = set()
        self._pattern = re.compile(rf"^{re.escape(served_name)}(?:@v|-v)(\d+)$")

    def engine_name(self, version: int) -> str:
        return f"{self.served_name}-v{version}"

    def resolve(self, model: str, user: str = "") -> Route:
        """`user`: whom a canary split counts (the user's pseudonym); "" is never split."""
        if model == self.served_name:
            canary = self.canary
            version = self.live_version
            if canary is not None and user and canary.takes(user):
                version = canary.version
            engine = self.served_name if version is None else self.engine_name(version)
            return Route(model, engine, version)
        if model == f"{self.served_name}@base":
            return Route(model, self.served_name, None)
        if (match := self._pattern.match(model)) and int(match[1]) in self.loaded:
            version = int(match[1])
            return Route(model, self.engine_name(version), version)
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise UnknownModel(
            f"The model '{shown}' does not exist. Available: {', '.join(self.names())}."
        )

    def metric_label(self, model: str) -> str:
        """What a client asked for, as a Prometheus label: a label lives as long as the process,
        so only names that resolve count; anything else is "unknown"."""
        try:
            return self.resolve(model).alias
        except UnknownModel:
            return "unknown"

    def pinned_version(self, model: str) -> int | None:
        """N for "<served>@vN" / "<served>-vN", loaded or not."""
        match = self._pattern.match(model)
        return int(match[1]) if match else None

    def names(self) -> list[str]:
        return [self.served_name, f"{self.served_name}@base"] + [
            f"{self.served_name}@v{v}" for v in sorted(self.loaded)
        ]
