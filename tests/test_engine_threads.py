"""Which OpenMP settings each process gets. The serving engine runs with vLLM's own (it chooses
its threads, libgomp its spin), so `dynalign serve` is vLLM's server plus dynalign by
construction; the learner keeps the settings measured best for it (shared/engine.py). On main
before this, the CLI set the learner's settings for every verb, and the server's engine core
inherited them (bench/results/serving-causes/)."""

from __future__ import annotations

import sys

import pytest
import typer

from dynalign import cli
from shared.engine import LEARNER_SPINCOUNT

OPENMP = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT")


def _run_cli(monkeypatch, argv: list[str]) -> dict[str, str | None]:
    """Run the `dynalign` entry point as a shell would; return the OpenMP settings the verb's
    work (and so any engine process it starts) sees."""
    seen: dict[str, str | None] = {}

    def capture(*args, **kwargs):
        import os

        seen.update({name: os.environ.get(name) for name in OPENMP})
        raise typer.Exit(0)

    for name in OPENMP:
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever main sets
    monkeypatch.setattr(cli, "_run_server", capture)
    monkeypatch.setattr(cli, "config_or_exit", capture)
    monkeypatch.setattr(sys, "argv", ["dynalign", *argv])
    with pytest.raises(SystemExit):
        cli.main()
    return seen


def test_dynalign_serve_leaves_the_engine_to_vllms_own_thread_settings(monkeypatch):
    seen = _run_cli(monkeypatch, ["serve", "--kafka", "127.0.0.1:9"])
    assert seen == {"OMP_NUM_THREADS": None, "GOMP_SPINCOUNT": None}


def test_dynalign_learn_keeps_the_learners_thread_settings(monkeypatch):
    seen = _run_cli(monkeypatch, ["learn", "--kafka", "127.0.0.1:9"])
    assert seen["GOMP_SPINCOUNT"] == LEARNER_SPINCOUNT
    assert int(seen["OMP_NUM_THREADS"]) >= 1
