"""The registry's lifecycle rules on real files (no engine): states, the live alias, audit."""

import json

import pytest

from shared.registry import Registry, RegistryError


@pytest.fixture()
def registry(tmp_path):
    """Three versions with placeholder weights (the lifecycle never reads them)."""
    reg = Registry(tmp_path / "store")
    for _ in range(3):
        src = tmp_path / "adapter"
        src.mkdir(exist_ok=True)
        (src / "adapter_model.safetensors").write_bytes(b"weights")
        (src / "adapter_config.json").write_text(json.dumps({"r": 8}))
        reg.publish(src, parent_version=None, base_model="m", base_fingerprint="f",
                    source_checkpoint=f"c{len(reg.versions())}", steps=1)
    return reg


def test_versions_are_allocated_in_order_and_found_by_checkpoint(registry):
    assert registry.versions() == [1, 2, 3]
    assert registry.find_by_checkpoint("c1") == 2
    assert registry.manifest(3).version == 3


def test_promote_and_rollback_move_live_and_are_audited(registry):
    registry.promote(1, "alice", "first")
    registry.promote(2, "bob", "better")
    state = registry.read_state()
    assert state.live == 2 and state.states == {1: "retired", 2: "live"}
    state = registry.rollback("carol", reason="regression")
    assert state.live == 1 and state.states[2] == "retired"
    registry.rollback("dave")  # before v1 there was only the base model
    assert registry.read_state().live is None
    log = [(e.actor, e.action, e.from_version, e.to_version) for e in registry.audit_log()]
    assert log == [("alice", "promote", None, 1), ("bob", "promote", 1, 2),
                   ("carol", "rollback", 2, 1), ("dave", "rollback", 1, None)]


@pytest.mark.parametrize("action, message", [
    (lambda r: r.promote(9, "x"), "v9 does not exist"),
    (lambda r: r.rollback("x"), "nothing to roll back to"),
    (lambda r: (r.promote(1, "x"), r.promote(1, "x")), "already live"),
    (lambda r: (r.promote(1, "x"), r.reject(1, "x", "bad")), "is live"),
    (lambda r: (r.reject(2, "gate", "kl"), r.promote(2, "x")), "rejected by the gate"),
])
def test_impossible_actions_say_why(registry, action, message):
    with pytest.raises(RegistryError, match=message):
        action(registry)


def test_gate_results_promote_reject_or_wait(registry):
    passed = {"passed": True, "reasons": []}
    state, action = registry.apply_gate(1, passed, auto_promote=True)
    assert action == "promote" and state.live == 1
    state, action = registry.apply_gate(2, {"passed": False, "reasons": ["KL 9 > 0.5"]}, True)
    assert action == "reject" and state.states[2] == "rejected" and state.live == 1
    registry.set_flag("pinned", True, "ops")
    state, action = registry.apply_gate(3, passed, auto_promote=True)
    assert action == "await-operator" and state.live == 1 and state.gate_results[3] == passed
    assert registry.audit_log()[-1].reason == "gate passed; live is pinned"


def test_rollback_to_a_rejected_version_is_refused(registry):
    registry.promote(1, "x")
    registry.reject(2, "gate", "worse")
    with pytest.raises(RegistryError, match="rejected"):
        registry.rollback("x", to=2)
    assert registry.read_state().live == 1


def test_a_garbled_state_file_is_rebuilt_from_the_audit_log(registry):
    registry.promote(1, "alice")
    registry.apply_gate(2, {"passed": False, "reasons": ["kl"]}, auto_promote=True)
    registry.set_flag("learning_paused", True, "ops")
    expected = registry.read_state()
    path = registry.root / Registry.STATE_FILE
    for damage in (b"", b'{"states": {"1": "li', b"\x00" * 40):
        path.write_bytes(damage)
        assert registry.read_state() == expected  # readers see the rebuilt state at once
        assert registry.recover() == expected  # start-up rewrites it ...
        assert Registry(registry.root).read_state() == expected
        assert json.loads(path.read_text())["live"] == 1
    kept = sorted(registry.root.glob("registry.json.corrupt-*"))
    assert kept and kept[-1].read_bytes() != b""  # ... keeping the damaged file to look at


def test_a_crash_between_audit_and_state_is_repaired(registry, monkeypatch):
    """The audit line is durable before the state file changes; a crash in between leaves
    the state behind the log, and the next transaction (or start-up) catches up."""
    import shared.registry as registry_module

    registry.promote(1, "alice")

    def crash(*args, **kwargs):
        raise SystemExit("killed between the audit line and the state file")

    monkeypatch.setattr(registry_module, "atomic_write", crash)
    with pytest.raises(SystemExit):
        registry.promote(2, "bob")
    monkeypatch.undo()
    assert [e.to_version for e in registry.audit_log()] == [1, 2]
    assert registry.recover().live == 2  # what the audit log says happened, happened
    state = registry.rollback("carol")
    assert state.live == 1 and state.revision == len(registry.audit_log())


def test_the_state_file_and_audit_log_are_fsynced(registry, monkeypatch):
    synced: list[str] = []
    real_fsync = __import__("os").fsync

    def spy(fd):
        synced.append(__import__("os").readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr("os.fsync", spy)
    registry.promote(1, "alice")
    names = [s.rsplit("/", 1)[-1] for s in synced]
    assert names[0] == Registry.AUDIT_FILE  # audit first
    assert ".registry.json.tmp" in names  # the new state file's contents
    assert "store" in names  # the directory, so the rename is durable
