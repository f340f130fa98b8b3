"""The learner's lineage against a real registry, with real PEFT adapters, vLLM and the gate:
after a rejection training continues from live (also across a restart), a fresh workdir never
takes an old run's version for its own, and a crash between publish and verdict is repaired."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.lifecycle import Lifecycle
from shared.registry import WEIGHTS, Registry, base_fingerprint
from tests.conftest import REPO, json_result
from tests.synthetic import random_lora

pytestmark = pytest.mark.slow

# What an old learner's first checkpoint was published as, before lineages carried a run id.
OLD_LINEAGE = "dynalign-learner/step-00000001"


@pytest.fixture
def store(tmp_path, tiny_model) -> Path:
    """v1: rejected, published under the lineage a fresh learner's first checkpoint used to
    match; v2: live."""
    lifecycle = Lifecycle(Registry(tmp_path / "adapters"))
    fields = dict(
        parent_version=None,
        base_model=tiny_model.name,
        base_fingerprint=base_fingerprint(tiny_model),
        steps=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for seed, lineage in ((1, OLD_LINEAGE), (2, "another-run/step-00000001")):
            adapter = random_lora(tiny_model, Path(tmp) / f"a{seed}", rank=8, seed=seed)
            lifecycle.publish(adapter, lineage=lineage, actor="test", **fields)
    lifecycle.reject(1, "test", "a bad old candidate")
    lifecycle.promote(2, "test")
    return tmp_path / "adapters"


def learner_run(
    tiny_model, workdir: Path, store: Path, steps: int, gate: str, crash_at: str | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    weights = workdir.parent / f"{workdir.name}-weights-{steps}-{gate}.safetensors"
    env = {**os.environ}
    if crash_at:
        env["DYNALIGN_LEARNER_CRASH_AT"] = crash_at
    log = workdir.parent / f"{workdir.name}-{steps}-{gate}.log"
    # Its own process group: after a SIGKILL the engine's processes are killed with it. Output
    # to a file: an orphaned engine process would hold a pipe open.
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "lineage_run.py"),
                str(tiny_model),
                str(workdir),
                str(store),
                str(steps),
                gate,
                str(weights),
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            process.wait(timeout=900)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, output, output), weights


def assert_same_weights(trained: Path, version_dir: Path) -> None:
    """The training weights (PEFT's state-dict names) equal a version's adapter file."""
    mine, theirs = load_file(str(trained)), load_file(str(version_dir / WEIGHTS))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)


def test_a_restart_after_a_rejection_trains_from_live(tmp_path, tiny_model, store):
    out, _ = learner_run(tiny_model, tmp_path / "learner", store, steps=1, gate="reject")
    assert out.returncode == 0, out.stderr[-3000:]
    state = json_result(out.stdout)
    assert state["lineage"]["3"] == f"{state['run_id']}/step-00000001"
    assert state["states"] == {"1": "rejected", "2": "live", "3": "rejected"}
    assert state["parent_version"] == 2  # continued from live at once

    out, weights = learner_run(tiny_model, tmp_path / "learner", store, steps=0, gate="reject")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json_result(out.stdout)["parent_version"] == 2
    assert_same_weights(weights, store / "v2")  # not the rejected v3 of its own checkpoint


def test_a_fresh_workdir_publishes_new_versions_and_never_promotes_an_old_one(
    tmp_path, tiny_model, store
):
    out, _ = learner_run(tiny_model, tmp_path / "fresh", store, steps=1, gate="pass")
    assert out.returncode == 0, out.stderr[-3000:]
    state = json_result(out.stdout)
    assert state["states"] == {"1": "rejected", "2": "retired", "3": "live"}
    assert state["lineage"]["3"] == f"{state['run_id']}/step-00000001"
    assert "1" not in state["gate"] and state["gate"]["3"]["outcome"] == "pass"
    assert Registry(store).manifest(3).parent_version == 2  # it started from live


def test_a_crash_between_publish_and_verdict_is_repaired(tmp_path, tiny_model, store):
    out, _ = learner_run(
        tiny_model, tmp_path / "learner", store, steps=1, gate="reject", crash_at="before-verdict"
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    registry = Registry(store)
    assert registry.versions() == [1, 2, 3]
    assert 3 not in registry.read_state().gate_results  # published, not judged

    out, weights = learner_run(tiny_model, tmp_path / "learner", store, steps=0, gate="reject")
    assert out.returncode == 0, out.stderr[-3000:]
    state = json_result(out.stdout)
    assert state["states"]["3"] == "rejected" and state["gate"]["3"]["outcome"] == "reject"
    assert state["live"] == 2 and state["parent_version"] == 2
    assert_same_weights(weights, store / "v2")
