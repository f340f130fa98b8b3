"""The scale-out rehearsal (bench/scaleout.py) on the tiny model: three `dynalign serve`
replicas behind HAProxy, one learner, one broker, clients chatting throughout; a replica and
the learner killed with SIGKILL and restarted (the replica first, while the learner rolls out
on it), a version promoted (with the CLI, while the
replica is down) and rolled back (through another replica's admin API). What a user
sees: no request fails once the client has retried, no accepted interaction is missing from
the topic (not even the answer the killed replica streamed last, with its group commit
stretched to 400 ms), every live replica serves a promote or rollback within a second of it,
the restarted replica comes back on the version promoted while it was down, the learner's
rollouts fail over to another replica, and the restarted learner trains on no offset twice."""

from __future__ import annotations

import json

import pytest

from bench.scaleout import rehearse

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_three_replicas_lose_nothing_through_kills_and_converge_on_promote_and_rollback(
    tmp_path, tiny_model
):
    result = rehearse(tiny_model, tmp_path, replicas=3, clients=2)
    summary = json.dumps(result, indent=2)
    assert result["accepted"] > 20, summary
    assert result["failed_after_retries"] == 0, summary
    assert result["lost"] == 0 and result["killed_replicas_last_answer_logged"], summary
    assert result["offsets_trained_twice"] == 0 and result["learner_versions"] >= 2, summary
    assert result["learner_rollout_failovers"] >= 1, summary
    assert result["promote_converged_s"] <= 1.0 and result["restarted_replica_serves_live"], summary
    assert result["rollback_converged_s"] <= 1.0, summary
