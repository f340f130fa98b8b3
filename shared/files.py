"""Durable-file helpers shared by the outbox, checkpoints, the adapter store and assets."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


class DirectoryInUse(RuntimeError):
    """Another process holds the directory (lock_directory)."""


def lock_directory(directory: Path, what: str) -> BinaryIO:
    """An exclusive lock on `directory` for this process, held until the returned file is
    closed (or the process ends, however it ends). Raises DirectoryInUse naming `what`: two
    writers of one outbox or one learner workdir would interleave their files."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / ".lock").open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DirectoryInUse(
            f"{what} {directory} is in use by another dynalign process; give each its own "
            "(--data-dir or DYNALIGN_DATA_DIR)"
        ) from None
    return lock


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list makes renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Everything under `root`, then `root` itself: before renaming a staged tree into place."""
    for path in [*Path(root).rglob("*"), Path(root)]:
        fsync_path(path)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content:
    write a temp file, fsync it, rename it over `path`, fsync the directory (the rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_jsonl(
    path: Path, on_unreadable: Callable[[int, ValueError], None] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file. A line that is not JSON
    raises ValueError naming the file and line, or, given `on_unreadable`, is passed to it and
    skipped (a line cut short by a crash, in files dynalign appends to)."""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                if on_unreadable is None:
                    raise ValueError(f"{path} line {number} is not JSON: {exc}") from exc
                on_unreadable(number, exc)
