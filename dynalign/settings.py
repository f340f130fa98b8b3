"""The CLI's view of the config: load it from flags, environment and file, or exit naming the
field that is wrong (whichever source it came from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from shared.config import DynalignConfig, load_config

console = Console()


def config_or_exit(
    config_file: Path | None = None, data_dir: Path | None = None, **flags: dict[str, Any]
) -> DynalignConfig:
    try:
        return load_config(config_file, data_dir, **flags)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            console.print(
                f"[red]configuration error:[/red] {field}: {error['msg']} "
                f"(got {error.get('input')!r})",
                soft_wrap=True,
            )
        raise typer.Exit(2) from None
