"""`dynalign log ...`: the interaction log. Kafka is its system of record; this reads it without
a consumer group, so the learner's offsets never move."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynalign.settings import config_or_exit
from shared.kafka import Bound, parse_bound, range_offsets, read_range

log_app = typer.Typer(no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

BOUND_HELP = "An offset (in every partition) or an ISO time, UTC unless it says otherwise."


def _bound(text: str | None, option: str) -> Bound | None:
    if text is None:
        return None
    try:
        return parse_bound(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {BOUND_HELP}", param_hint=option) from None


@log_app.command("export")
def export(
    from_: Annotated[
        str | None, typer.Option("--from", help=BOUND_HELP + " Default: the start.")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Exclusive. Default: the end, as it is now.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSONL file (default stdout).")] = None,
    topic: Annotated[str | None, typer.Option(help="Default: the interactions topic.")] = None,
    kafka: Annotated[str | None, typer.Option("--kafka")] = None,
    config: Annotated[Path | None, typer.Option("--config")] = None,
) -> None:
    """The records in [--from, --to) as JSONL, one a line: partition, offset, time and the
    record as the server wrote it (opted-out requests were never logged; user ids are the
    server's salted hashes)."""
    start, end = _bound(from_, "--from"), _bound(to, "--to")
    cfg = config_or_exit(config, kafka={"bootstrap": kafka})
    if not cfg.kafka.bootstrap:
        raise typer.BadParameter("no Kafka configured", param_hint="--kafka")
    name = topic or cfg.kafka.interactions_topic
    sink = out.open("w") if out else sys.stdout
    count = 0
    try:
        begin, stop = range_offsets(cfg.kafka.bootstrap, name, start, end)
        for message in read_range(cfg.kafka.bootstrap, name, begin, stop):
            try:
                record = json.loads(message.value)
            except ValueError:  # a garbled record is exported as it is, not dropped
                record = message.value.decode(errors="replace")
            line = {
                "partition": message.partition,
                "offset": message.offset,
                "time": datetime.fromtimestamp(message.timestamp / 1000, UTC).isoformat(),
                "record": record,
            }
            sink.write(json.dumps(line) + "\n")
            count += 1
    finally:
        if out:
            sink.close()
    console.print(f"{count} records from {name}" + (f" to {out}" if out else ""))
