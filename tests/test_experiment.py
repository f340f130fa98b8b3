"""`dynalign experiment` on the real loop, minutes-long on the tiny model: a broker, a server and a
learner sharing one registry; simulated users' traffic until the learner has stepped, then every
promoted version and base evaluated; every field and file of the report is produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from offline.evaluate import read_prompts
from offline.experiment import VersionResult, spread
from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics, free_port
from shared.registry import Registry
from tests.conftest import API_KEY, REPO, read_records, start_server

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_spread_keeps_the_first_and_last_versions_evenly_spaced():
    assert spread([1, 2, 3], 4) == [1, 2, 3]
    assert spread(list(range(1, 16)), 4) == [1, 6, 10, 15]
    assert spread([3, 7], 1) == [7]


def test_experiment_reports_promoted_versions_against_base(tmp_path, tiny_model):
    metrics_port = free_port()
    shared_env = {
        "DYNALIGN_REGISTRY__STORE": str(tmp_path / "adapters"),
        "DYNALIGN_LEARNER__METRICS_PORT": str(metrics_port),
    }
    learner_env = {
        **os.environ,
        **shared_env,
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "16",
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
        "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "1",
        "DYNALIGN_LEARNER__MAX_USER_SHARE": "1.0",  # one API key: one principal
        # A gate that lets the tiny model's candidates through, so versions get promoted.
        "DYNALIGN_GATE__PROBE_LIMIT": "4",
        "DYNALIGN_GATE__MAX_NEW_TOKENS": "8",
        "DYNALIGN_GATE__IFEVAL_PROMPTS": "0",
        "DYNALIGN_GATE__SCORE_MARGIN": "1e9",
        "DYNALIGN_GATE__MAX_KL": "1e9",
        "DYNALIGN_GATE__MAX_LENGTH_RATIO": "1e9",
    }
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        # Room for the judge's prompt (the paper's reward prompt is about 500 tiny-model tokens).
        server = start_server(
            tmp_path,
            tiny_model,
            broker.bootstrap,
            env={**shared_env, "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024"},
        )
        learner = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynalign",
                "learn",
                "--kafka",
                broker.bootstrap,
                "--model",
                str(tiny_model),
                "--workdir",
                str(tmp_path / "learner"),
            ],
            env=learner_env,
            stdout=(tmp_path / "learner.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out = tmp_path / "results"
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dynalign",
                    "experiment",
                    "--budget-steps",
                    "2",
                    "--budget-minutes",
                    "15",
                    "--heldout-limit",
                    "4",
                    "--ifeval-prompts",
                    "4",
                    "--max-tokens",
                    "8",
                    "--traffic-max-tokens",
                    "8",
                    "--resamples",
                    "50",
                    "--max-versions",
                    "1",
                    "--users",
                    "2",
                    "--ahead",
                    "4",
                    "--base-url",
                    f"{server.base_url}/v1",
                    "--api-key",
                    API_KEY,
                    "--out",
                    str(out),
                ],
                env={**os.environ, **shared_env},
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            # Everything in the topic (the learner has read it all by now).
            logged = [
                r
                for r, _ in read_records(
                    broker.bootstrap,
                    KafkaConfig().interactions_topic,
                    lambda r: True,
                    expected=10**6,
                    timeout_s=5,
                )
            ]
        finally:
            learner.terminate()
            learner.wait(timeout=120)
            server.stop()

    report = json.loads((out / "alignment.json").read_text())
    assert report["traffic"]["learner_steps"] >= 2 and report["heldout_prompts"] == 4
    base, *versions = report["versions"]
    assert base["version"] is None and versions, report  # at least one version went live
    assert 0 <= base["truncated_share"] <= 1
    # Every promoted version with the gate's verdict; only the last one evaluated (--max-versions).
    promoted = report["promoted"]
    curve = report["reward_curve"]  # the learner's self-reward at every version it published
    assert [p["version"] for p in curve] == sorted(p["version"] for p in curve) and curve
    assert {g["version"] for g in promoted} <= {p["version"] for p in curve}
    assert promoted and all(g["outcome"] == "pass" for g in promoted), promoted
    assert [row["version"] for row in versions] == [promoted[-1]["version"]]
    fields = set(VersionResult.model_fields)
    for row in versions:
        assert set(row) == fields and row["version"] > 0 and row["steps"] >= 1
        assert 0 <= row["ifeval_strict"] <= 1 and row["length_ratio"] > 0
        assert 0 <= row["truncated_share"] <= 1
        assert row["kl_to_base"] is not None and row["inconsistent_share"] is not None
        # A random tiny model puts no digit among its top log-probs: a judge that cannot score
        # leaves the score empty, never made up; a scored one lies inside its CI.
        score = json.loads((out / "experiment" / f"v{row['version']}" / "score.json").read_text())
        assert score["prompts"] == 4 and (row["score_diff"] is None) == (score["scored"] == 0)
        if row["score_diff"] is not None:
            low, high = row["score_diff_ci"]
            assert low <= row["score_diff"] <= high
    assert Image.open(out / "report.png").format == "PNG"
    summary = (out / "summary.md").read_text()
    assert "| base |" in summary and f"| v{versions[-1]['version']} |" in summary
    assert f"Gate verdicts on the {len(promoted)} promoted versions" in summary
    # The learner was paused for the evaluation and resumed after it, audited.
    audit = Registry(tmp_path / "adapters").audit_log()
    assert [(e.actor, e.action) for e in audit if e.actor == "experiment"] == [
        ("experiment", "pause-learning"),
        ("experiment", "resume-learning"),
    ]
    # It waited for the learner's step in flight: every version promoted before the learner
    # resumed is in the report, none gated behind the evaluation's back.
    resumed = next(i for i, e in enumerate(audit) if e.action == "resume-learning")
    assert [g["version"] for g in promoted] == [
        e.to_version for e in audit[:resumed] if e.action in ("promote", "promote-override")
    ]
    # The traffic was logged; the held-out evaluation never was.
    asked = {r["messages"][-1]["content"] for r in logged}
    train, held = (
        read_prompts(REPO / "shared" / "data" / "ca_prompts" / f"{name}.jsonl")
        for name in ("train", "heldout")
    )
    assert asked and asked <= set(train) and not asked & set(held[:4])
