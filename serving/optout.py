"""Training opt-out: how a request says it, and conversations that stay opted out.

A request opts out with the header `X-Dynalign-No-Train: true` or `"metadata": {"train": false}`.
Once a turn of a conversation opted out, later turns carry that turn in their history, so they
are never logged either, even without the flag. The opted-out conversation ids are kept in a
file beside the outbox, so a restart remembers them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from shared.files import atomic_write

log = logging.getLogger(__name__)

TRUE_SPELLINGS = frozenset({"true", "1", "yes", "on", "y", "t"})
FALSE_SPELLINGS = frozenset({"false", "0", "no", "off", "n", "f"})


def parse_flag(value: Any, name: str) -> bool:
    """A boolean as clients spell it (JSON true/false, 1/0, "False", "no", ...); anything else
    is refused rather than guessed, since guessing wrong here logs what a user wanted kept out."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        spelled = value.strip().lower()
        if spelled in TRUE_SPELLINGS:
            return True
        if spelled in FALSE_SPELLINGS:
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


class OptOuts:
    """A bounded, durable set of opted-out conversation ids (the newest `max_entries` kept)."""

    FILE = "opted-out-conversations.txt"

    def __init__(self, directory: Path | None, max_entries: int = 1_000_000) -> None:
        self.path = Path(directory) / self.FILE if directory is not None else None
        self.max_entries = max_entries
        self._ids: OrderedDict[str, None] = OrderedDict()
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                if line.strip():
                    self._remember(line.strip())

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._ids

    def add(self, *conversation_ids: str) -> None:
        new = [c for c in conversation_ids if c and c not in self._ids]
        for conversation_id in new:
            self._remember(conversation_id)
        if not new or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(f"{c}\n" for c in new))
            f.flush()
            os.fsync(f.fileno())
        if self.path.stat().st_size > 2 * 40 * self.max_entries:  # ids are ~33 bytes a line
            atomic_write(self.path, "".join(f"{c}\n" for c in self._ids).encode())

    def _remember(self, conversation_id: str) -> None:
        self._ids[conversation_id] = None
        self._ids.move_to_end(conversation_id)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)
