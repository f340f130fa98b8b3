"""`dynalign learn --replay FROM..TO` on a real broker with the real engine (tiny model): it trains
on exactly that range of the log, in its own consumer group and workdir, then stops; the live
learner's group is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaAdminClient

from learner import checkpoint
from shared.config import load_config
from shared.kafka import EmbeddedBroker, ensure_topics
from tests.test_consumer import produce

pytestmark = pytest.mark.slow


def committed(bootstrap: str, group: str) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group)[group]
    except KeyError:
        return {}
    finally:
        admin.close()
    return {f"{tp.topic}:{tp.partition}": m.offset for tp, m in offsets.items() if m.offset >= 0}


def test_replay_trains_on_the_range_only_and_leaves_the_live_group_alone(
    tmp_path, tiny_model, data_dir
):
    group = f"live-{uuid.uuid4().hex[:6]}"
    with EmbeddedBroker() as broker:
        cfg = load_config(kafka={"bootstrap": broker.bootstrap, "partitions": 1})
        ensure_topics(cfg.kafka)
        produce(cfg, *((f"user-{i}", f"Plan community project number {i}.") for i in range(8)))
        env = {
            **os.environ,
            "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
            # 2 prompts x 4 candidates a step, a checkpoint a step.
            "DYNALIGN_LEARNER__GROUP_SIZE": "4",
            "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "8",
            "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
            "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "1",
            "DYNALIGN_LEARNER__CONSUMER_GROUP": group,
            "DYNALIGN_REGISTRY__STORE": str(tmp_path / "adapters"),
            "DYNALIGN_GATE__ENABLED": "false",
        }
        run = subprocess.run(
            [sys.executable, "-m", "dynalign", "learn", "--kafka", broker.bootstrap,
             "--model", str(tiny_model), "--replay", "2..6"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        key = f"{cfg.kafka.interactions_topic}:0"
        # Offsets 2..5 are four prompts: two steps, then the range is read and it stops.
        _, state = checkpoint.latest(data_dir / "replay-2..6")
        assert state.step == 2 and state.next_offsets == {key: 6}
        assert committed(broker.bootstrap, f"{group}-replay") == {key: 6}
        assert committed(broker.bootstrap, group) == {}
        assert not (data_dir / "learner").exists()

        bad = subprocess.run(
            [sys.executable, "-m", "dynalign", "learn", "--kafka", broker.bootstrap,
             "--replay", "yesterday"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode == 2 and "--replay" in bad.stderr and "'yesterday'" in bad.stderr
