"""A bad setting fails at start, naming the field, whichever source it came from (flag,
environment, file); nothing starts first (no engine, no broker)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import load_config


def dynalign(*args: str, env: dict[str, str] | None = None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dynalign", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_a_misspelt_flag_value_exits_2_naming_the_field(tmp_path):
    out = dynalign(
        "learn",
        "--reward-mode",
        "expectd",
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--workdir",
        str(tmp_path / "learner"),
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "learner.reward_mode" in out.stdout and "expectd" in out.stdout
    assert not (tmp_path / "learner").exists()  # nothing was started


def test_a_bad_environment_value_exits_2_naming_the_field(tmp_path):
    out = dynalign("serve", "--kafka", "127.0.0.1:1", env={"DYNALIGN_LEARNER__LR": "fast"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "learner.lr" in out.stdout


def test_an_unknown_key_in_the_config_file_exits_2_naming_it(tmp_path):
    config = tmp_path / "dynalign.yaml"
    config.write_text("learner:\n  group_sise: 8\n")
    out = dynalign("learn", "--config", str(config), "--prompts", str(tmp_path / "p.jsonl"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "learner.group_sise" in out.stdout


def test_flags_are_validated_not_merged_blindly():
    with pytest.raises(ValueError, match="reward_mode"):
        load_config(learner={"reward_mode": "expectd"})
    assert load_config(learner={"reward_mode": "greedy"}).learner.reward_mode == "greedy"


def test_the_lora_profile_is_the_default_and_the_paper_profile_keeps_section_3_1():
    from shared.config import LORA_PROFILE, LearnerConfig

    assert LearnerConfig().lr == LORA_PROFILE["lr"] != 5e-6
    paper = LearnerConfig(profile="paper")
    assert (paper.lr, paper.batch_completions, paper.group_size) == (5e-6, 32, 8)
    assert (paper.clip_eps, paper.kl_beta, paper.temperature, paper.top_p) == (0.2, 0.04, 1.0, 1.0)
    assert LearnerConfig(lr=1e-5).lr == 1e-5  # what the user sets wins over the profile


def test_state_defaults_to_one_per_user_directory_whatever_the_working_directory(
    tmp_path, monkeypatch
):
    """`dynalign adapters list` from another folder sees the same registry: the data
    directory is per user ($XDG_DATA_HOME/dynalign here), not the working directory."""
    import json

    from shared.registry import Registry

    monkeypatch.delenv("DYNALIGN_DATA_DIR")
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    monkeypatch.setenv("XDG_DATA_HOME", env["XDG_DATA_HOME"])
    cfg = load_config()
    assert cfg.data_dir == tmp_path / "xdg" / "dynalign"
    assert cfg.registry.store == cfg.data_dir / "adapters"
    assert cfg.serving.outbox_dir == cfg.data_dir / "outbox"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    Registry(cfg.registry.store).publish(
        adapter,
        lineage="run/step-1",
        parent_version=None,
        base_model="m",
        base_fingerprint="f",
        steps=1,
    )
    listed = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        out = dynalign("adapters", "list", "--json", env=env, cwd=tmp_path / folder)
        assert out.returncode == 0, out.stdout + out.stderr
        listed.append([row["version"] for row in json.loads(out.stdout)["versions"]])
    assert listed == [[1], [1]]
    # --data-dir (or DYNALIGN_DATA_DIR) moves all of it.
    moved = load_config(data_dir=tmp_path / "elsewhere")
    assert moved.registry.store == tmp_path / "elsewhere" / "adapters"
