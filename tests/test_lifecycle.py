"""The adapter lifecycle on real files (no engine): which transitions are allowed from which
state, the live alias, the audit log as a journal, crash repair."""

import json

import pytest

from shared.config import GateConfig
from shared.gate_result import GateResult
from shared.lifecycle import TRANSITIONS, Lifecycle
from shared.registry import Registry, RegistryError


@pytest.fixture()
def lifecycle(tmp_path):
    """Three candidates with placeholder weights (the lifecycle never reads them)."""
    lc = Lifecycle(Registry(tmp_path / "store"))
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8}))
    for step in range(3):
        lc.publish(
            src,
            lineage=f"run-a/step-{step}",
            parent_version=None,
            base_model="m",
            base_fingerprint="f",
            steps=1,
        )
    return lc


@pytest.fixture()
def registry(lifecycle):
    return lifecycle.registry


def verdict(outcome: str, *reasons: str) -> GateResult:
    """A gate result whose outcome and reasons decide; its figures are placeholders."""
    return GateResult(
        outcome=outcome,
        reasons=list(reasons),
        probes=8,
        score_candidate=3.0,
        score_live=3.0,
        score_diff=0.0,
        score_diff_ci=(-0.1, 0.1),
        score_margin=0.25,
        kl=0.01,
        length_ratio=1.0,
    )


PASSED = verdict("pass")
FAILED = verdict("reject", "KL 9 > 0.5")
UNSURE = verdict("inconclusive", "score -0.1 (95% CI -0.3..+0.1)")
RULE = GateConfig().canary_rule(share=0.2)


def sha(registry, version):
    return registry.manifest(version).weights_sha256


def test_publishing_a_lineage_twice_returns_the_same_version(lifecycle, tmp_path):
    registry = lifecycle.registry
    assert registry.versions() == [1, 2, 3]
    again = lifecycle.publish(
        tmp_path / "adapter",
        lineage="run-a/step-1",
        parent_version=None,
        base_model="m",
        base_fingerprint="f",
        steps=1,
    )
    assert again.version == 2 and registry.versions() == [1, 2, 3]
    # Another run's step 1 (a fresh workdir restarts step numbers) is a new version.
    other = lifecycle.publish(
        tmp_path / "adapter",
        lineage="run-b/step-1",
        parent_version=None,
        base_model="m",
        base_fingerprint="f",
        steps=1,
    )
    assert other.version == 4
    assert [e.action for e in registry.audit_log()] == ["publish"] * 4


def test_promote_and_rollback_move_live_and_are_audited(lifecycle, registry):
    lifecycle.promote(1, "alice", "first")
    lifecycle.promote(2, "bob", "better")
    state = registry.read_state()
    assert state.live == 2 and state.states == {1: "retired", 2: "live"}
    state = lifecycle.rollback("carol", reason="regression")
    assert state.live == 1 and state.states[2] == "retired"
    lifecycle.rollback("dave")  # before v1 there was only the base model
    assert registry.read_state().live is None
    log = [
        (e.actor, e.action, e.from_version, e.to_version)
        for e in registry.audit_log()
        if e.action != "publish"
    ]
    assert log == [
        ("alice", "promote", None, 1),
        ("bob", "promote", 1, 2),
        ("carol", "rollback", 2, 1),
        ("dave", "rollback", 1, None),
    ]


# Every action against a version in every state: allowed (the state after) or refused (why).
STATES = {
    "candidate": lambda lc: None,
    "live": lambda lc: lc.promote(1, "x"),
    "retired": lambda lc: (lc.promote(1, "x"), lc.promote(2, "x")),
    "rejected": lambda lc: lc.reject(1, "x", "bad"),
    "inconclusive": lambda lc: lc.record_verdict(1, UNSURE, sha(lc.registry, 1), True, "hold"),
    "canary": lambda lc: lc.start_canary(1, RULE, "x"),
}
ACTIONS = {
    "promote": lambda lc: lc.promote(1, "op"),
    "promote-override": lambda lc: lc.promote(1, "op", override=True),
    "rollback --to": lambda lc: lc.rollback("op", to=1),
    "reject": lambda lc: lc.reject(1, "op", "no"),
    "verdict pass": lambda lc: lc.record_verdict(1, PASSED, sha(lc.registry, 1), True),
    "verdict fail": lambda lc: lc.record_verdict(1, FAILED, sha(lc.registry, 1), True),
    "verdict unsure": lambda lc: lc.record_verdict(1, UNSURE, sha(lc.registry, 1), True, "hold"),
    "canary-start": lambda lc: lc.start_canary(1, RULE, "op"),
}
EXPECTED = {  # (action, state of v1 before) -> state of v1 after, or the refusal's words
    ("promote", "candidate"): "live",
    ("promote", "live"): "already live",
    ("promote", "retired"): "live",
    ("promote", "rejected"): "rejected by the gate",
    ("promote-override", "candidate"): "live",
    ("promote-override", "live"): "already live",
    ("promote-override", "retired"): "live",
    ("promote-override", "rejected"): "live",
    ("rollback --to", "candidate"): "never live",
    ("rollback --to", "live"): "already live",
    ("rollback --to", "retired"): "live",
    ("rollback --to", "rejected"): "rejected by the gate",
    ("reject", "candidate"): "rejected",
    ("reject", "live"): "is live",
    ("reject", "retired"): "rejected",
    ("reject", "rejected"): "it is rejected",
    ("verdict pass", "candidate"): "live",
    ("verdict pass", "live"): "already live",
    ("verdict pass", "retired"): "it is retired",
    ("verdict pass", "rejected"): "it is rejected",
    ("verdict fail", "candidate"): "rejected",
    ("verdict fail", "live"): "already live",
    ("verdict fail", "retired"): "it is retired",
    ("verdict fail", "rejected"): "it is rejected",
    ("verdict unsure", "candidate"): "inconclusive",
    ("verdict unsure", "live"): "already live",
    ("verdict unsure", "retired"): "it is retired",
    ("verdict unsure", "rejected"): "it is rejected",
    # Held for an operator: promoted or rejected by one, never judged again.
    ("promote", "inconclusive"): "live",
    ("promote-override", "inconclusive"): "live",
    ("rollback --to", "inconclusive"): "it is inconclusive",
    ("reject", "inconclusive"): "rejected",
    ("verdict pass", "inconclusive"): "it is inconclusive",
    ("verdict fail", "inconclusive"): "it is inconclusive",
    ("verdict unsure", "inconclusive"): "it is inconclusive",
    # A canary: decided by its rule or an operator (promote, reject), never judged again.
    ("promote", "canary"): "live",
    ("promote-override", "canary"): "live",
    ("rollback --to", "canary"): "it is canary",
    ("reject", "canary"): "rejected",
    ("verdict pass", "canary"): "it is canary",
    ("verdict fail", "canary"): "it is canary",
    ("verdict unsure", "canary"): "it is canary",
    ("canary-start", "candidate"): "canary",
    ("canary-start", "inconclusive"): "canary",
    ("canary-start", "canary"): "already a canary",
    ("canary-start", "live"): "already live",
    ("canary-start", "retired"): "it is retired",
    ("canary-start", "rejected"): "rejected by the gate",
}


@pytest.mark.parametrize("action, before", sorted(EXPECTED))
def test_every_transition_is_allowed_or_refused_by_the_one_table(lifecycle, action, before):
    STATES[before](lifecycle)
    expected = EXPECTED[(action, before)]
    if expected in ("live", "rejected", "retired", "candidate", "inconclusive", "canary"):
        ACTIONS[action](lifecycle)
        assert lifecycle.state().states.get(1, "candidate") == expected
    else:
        revision = lifecycle.state().revision
        with pytest.raises(RegistryError, match=expected):
            ACTIONS[action](lifecycle)
        assert lifecycle.state().revision == revision  # a refusal changes nothing
    overrides = [e for e in lifecycle.registry.audit_log() if e.action == "promote-override"]
    assert bool(overrides) == (action == "promote-override" and expected == "live")


def test_the_table_names_every_action_the_lifecycle_takes():
    assert set(TRANSITIONS) == {
        "promote",
        "promote-override",
        "rollback",
        "reject",
        "verdict",
        "canary-start",
    }


def test_a_canary_starts_from_a_pass_and_ends_by_its_rule_or_an_operator(lifecycle, registry):
    state, action = lifecycle.record_verdict(1, PASSED, sha(registry, 1), True, canary=RULE)
    assert action == "canary-start" and state.live is None and state.states[1] == "canary"
    assert (state.canary.version, state.canary.against, state.canary.share) == (1, None, 0.2)
    # one canary at a time: the next pass waits for an operator
    state, action = lifecycle.record_verdict(2, PASSED, sha(registry, 2), True, canary=RULE)
    assert action == "await-operator" and state.canary.version == 1
    assert "another canary is running" in registry.audit_log()[-1].reason
    state = lifecycle.extend_canary(800, "ops", "quiet weekend")
    assert state.canary.max_ratings == 800
    with pytest.raises(RegistryError, match="extend beyond it"):
        lifecycle.extend_canary(100, "ops")
    evidence = {"diff": -0.02}
    state = lifecycle.end_canary("promote", "canary-rule", "not worse", evidence)
    assert state.live == 1 and state.canary is None and state.states[1] == "live"
    assert registry.audit_log()[-1].canary == evidence
    # rolled back: rejected; stopped: a candidate again; inconclusive: held for an operator
    for outcome, after in (("rollback", "rejected"), ("stop", "candidate")):
        lifecycle.start_canary(3 if outcome == "rollback" else 2, RULE, "ops")
        state = lifecycle.end_canary(outcome, "ops")
        assert state.canary is None and state.live == 1
        assert state.states[3 if outcome == "rollback" else 2] == after
    lifecycle.start_canary(2, RULE, "ops")
    assert lifecycle.end_canary("inconclusive", "canary-rule").states[2] == "inconclusive"
    with pytest.raises(RegistryError, match="no canary is running"):
        lifecycle.end_canary("stop", "ops")
    lifecycle.start_canary(2, RULE, "ops")  # the rule's evidence was about another canary
    with pytest.raises(RegistryError, match="v3 is no longer the canary"):
        lifecycle.end_canary("promote", "canary-rule", version=3)
    assert Registry(registry.root).read_state() == lifecycle.state()


def test_live_moving_under_a_canary_ends_it(lifecycle, registry):
    lifecycle.promote(1, "ops")
    lifecycle.start_canary(2, RULE, "ops")
    state = lifecycle.promote(3, "ops")  # the comparison with v1 no longer holds
    assert state.canary is None and state.states[2] == "candidate" and state.live == 3


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda lc: lc.promote(9, "x"), "v9 does not exist"),
        (lambda lc: lc.rollback("x"), "nothing to roll back to"),
    ],
)
def test_impossible_actions_say_why(lifecycle, action, message):
    with pytest.raises(RegistryError, match=message):
        action(lifecycle)


def test_a_verdict_belongs_to_the_weights_it_judged(lifecycle, registry):
    with pytest.raises(RegistryError, match="judged other weights"):
        lifecycle.record_verdict(1, PASSED, "0" * 64, auto_promote=True)
    assert registry.read_state().live is None and 1 not in registry.read_state().gate_results


def test_gate_results_promote_reject_or_wait(lifecycle, registry):
    state, action = lifecycle.record_verdict(1, PASSED, sha(registry, 1), auto_promote=True)
    assert action == "promote" and state.live == 1
    state, action = lifecycle.record_verdict(2, FAILED, sha(registry, 2), True)
    assert action == "reject" and state.states[2] == "rejected" and state.live == 1
    lifecycle.set_flag("pin", "ops")
    state, action = lifecycle.record_verdict(3, PASSED, sha(registry, 3), auto_promote=True)
    assert action == "await-operator" and state.live == 1 and state.gate_results[3] == PASSED
    assert registry.audit_log()[-1].reason == "gate passed; live is pinned"


@pytest.mark.parametrize(
    "policy, action, state",
    [
        ("hold", "hold-inconclusive", "inconclusive"),
        ("reject", "reject", "rejected"),
        ("promote", "promote", "live"),
    ],
)
def test_an_inconclusive_verdict_follows_gate_on_inconclusive(
    lifecycle, registry, policy, action, state
):
    after, taken = lifecycle.record_verdict(1, UNSURE, sha(registry, 1), True, policy)
    assert taken == action and after.states[1] == state
    assert "inconclusive" in registry.audit_log()[-1].reason
    assert Registry(registry.root).read_state() == after  # replayed from the audit log alike


def test_a_held_version_waits_for_an_operator(lifecycle, registry):
    lifecycle.record_verdict(1, UNSURE, sha(registry, 1), True, "hold")
    with pytest.raises(RegistryError, match="cannot verdict"):  # judged once, not again
        lifecycle.record_verdict(1, PASSED, sha(registry, 1), True)
    assert lifecycle.promote(1, "ops").live == 1
    lifecycle.record_verdict(2, UNSURE, sha(registry, 2), True, "hold")
    assert lifecycle.reject(2, "ops", "not convinced").states[2] == "rejected"


def test_a_garbled_state_file_is_rebuilt_from_the_audit_log(lifecycle, registry):
    lifecycle.promote(1, "alice")
    lifecycle.record_verdict(2, FAILED, sha(registry, 2), auto_promote=True)
    lifecycle.set_flag("pause-learning", "ops")
    expected = registry.read_state()
    path = registry.root / Registry.STATE_FILE
    for damage in (b"", b'{"states": {"1": "li', b"\x00" * 40):
        path.write_bytes(damage)
        assert registry.read_state() == expected  # readers see the rebuilt state at once
        assert lifecycle.reconcile() == expected  # start-up rewrites it ...
        assert Registry(registry.root).read_state() == expected
        assert json.loads(path.read_text())["live"] == 1
    kept = sorted(registry.root.glob("registry.json.corrupt-*"))
    assert kept and kept[-1].read_bytes() != b""  # ... keeping the damaged file to look at


def test_a_crash_between_audit_and_state_is_repaired(lifecycle, registry, monkeypatch):
    """The audit line is durable before the state file changes; a crash in between leaves
    the state behind the log, and the next transaction (or start-up) catches up."""
    import shared.registry as registry_module

    lifecycle.promote(1, "alice")

    def crash(*args, **kwargs):
        raise SystemExit("killed between the audit line and the state file")

    monkeypatch.setattr(registry_module, "atomic_write", crash)
    with pytest.raises(SystemExit):
        lifecycle.promote(2, "bob")
    monkeypatch.undo()
    assert [e.to_version for e in registry.audit_log() if e.action == "promote"] == [1, 2]
    assert lifecycle.reconcile().live == 2  # what the audit log says happened, happened
    state = lifecycle.rollback("carol")
    assert state.live == 1 and state.revision == len(registry.audit_log())


def test_the_state_file_and_audit_log_are_fsynced(lifecycle, monkeypatch):
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr("os.fsync", spy)
    lifecycle.promote(1, "alice")
    names = [s.rsplit("/", 1)[-1] for s in synced]
    assert names[0] == Registry.AUDIT_FILE  # audit first
    assert ".registry.json.tmp" in names  # the new state file's contents
    assert "store" in names  # the directory, so the rename is durable
