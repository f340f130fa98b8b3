"""The adapter lifecycle: every change to a version's state goes through here, from every caller
(the /admin routes, `dynalign adapters`, the learner's publish and gate, start-up repair).

    publish    a candidate from a learner checkpoint, keyed by its lineage (run id + step):
               publishing a lineage again returns the version it already has
    verdict    the gate's result for a candidate, bound to the weights it judged:
               pass → live (or await an operator when pinned / auto-promotion is off),
               reject → rejected, inconclusive → per gate.on_inconclusive: held as
               `inconclusive` for an operator, promoted as a pass, or rejected
    promote    an operator makes a candidate or a previously-live version live
    rollback   live goes back to the previous live version (or --to a previously-live one)
    reject     an operator rejects a candidate
    canary     a passing candidate serves a share of the main alias's users beside live
               (gate.canary_share, or an operator): start, extend, stop, and its decision
               (shared/canary.py, or an operator's): promote, or roll back (= reject)
    pin, unpin, pause-learning, resume-learning

A rejected version never goes live except by `promote(..., override=True)`, audited as
"promote-override". Each change runs under the registry's lock: the transition is checked
against the current state, the audit line is written, then the state, then the change is
announced on the control topic (a no-op without a broker; servers also poll the files).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from shared.gate_result import GateResult
from shared.registry import (
    AdapterState,
    AuditEntry,
    Manifest,
    Registry,
    RegistryError,
    RegistryState,
    verify_adapter,
)

log = logging.getLogger(__name__)

# The states a version may be in for each action that targets it. Anything else is refused.
TRANSITIONS: dict[str, frozenset[AdapterState]] = {
    "promote": frozenset({"candidate", "inconclusive", "canary", "retired"}),
    "promote-override": frozenset({"candidate", "inconclusive", "canary", "retired", "rejected"}),
    "rollback": frozenset({"retired"}),
    "reject": frozenset({"candidate", "inconclusive", "canary", "retired"}),
    "verdict": frozenset({"candidate"}),
    "canary-start": frozenset({"candidate", "inconclusive"}),
}
OnInconclusive = Literal["hold", "promote", "reject"]
FLAGS = {
    "pin": ("pinned", True),
    "unpin": ("pinned", False),
    "pause-learning": ("learning_paused", True),
    "resume-learning": ("learning_paused", False),
}
FlagAction = Literal["pin", "unpin", "pause-learning", "resume-learning"]
Announce = Callable[[RegistryState, str, str], None]


class _AlreadyPublished(Exception):
    def __init__(self, version: int) -> None:
        self.version = version


def _allowed(action: str, state: RegistryState, version: int) -> None:
    current = state.states.get(version, "candidate")
    if current == "live":
        raise RegistryError(f"v{version} is already live")
    if current not in TRANSITIONS[action]:
        hint = {
            "rejected": "it was rejected by the gate; promote --override to force it",
            "candidate": "it was never live; promote it instead",
        }.get(current, "")
        raise RegistryError(
            f"cannot {action} v{version}: it is {current}" + (f" ({hint})" if hint else "")
        )


class Lifecycle:
    def __init__(self, registry: Registry, announce: Announce | None = None) -> None:
        self.registry = registry
        self._announce = announce

    @classmethod
    def from_config(cls, cfg) -> Lifecycle:
        """The registry named by the config; announced on its control topic when Kafka is set."""
        registry = Registry(cfg.registry.store)
        if not cfg.kafka.bootstrap:
            return cls(registry)
        return cls(registry, lambda state, actor, action: announce(cfg, state, actor, action))

    # -- reading ---------------------------------------------------------------------------------
    def state(self) -> RegistryState:
        return self.registry.read_state()

    def reconcile(self) -> RegistryState:
        """At start-up: repair what a crash left half done (see Registry.recover)."""
        return self.registry.recover()

    def servable_problems(self, version: int, fingerprint: str, max_rank: int) -> list[str]:
        if version not in self.registry.versions():
            return [f"v{version} does not exist (versions: {self.registry.versions()})"]
        return verify_adapter(self.registry.path(version), fingerprint, max_rank).problems

    # -- changes ---------------------------------------------------------------------------------
    def publish(
        self, adapter_dir: Path, lineage: str, actor: str = "learner", **fields: Any
    ) -> Manifest:
        """The candidate for `lineage`, published once: a learner repeating a publish after a
        crash gets the same version back, and a new run never collides with an old one."""
        published: list[Manifest] = []

        def decide(state: RegistryState) -> AuditEntry:
            found = self.registry.find_by_lineage(lineage)
            if found is not None:
                raise _AlreadyPublished(found)
            published.append(self.registry.publish(adapter_dir, lineage=lineage, **fields))
            return AuditEntry(
                actor=actor, action="publish", to_version=published[0].version, reason=lineage
            )

        try:
            self._change(decide)
        except _AlreadyPublished as found:
            return self.registry.manifest(found.version)
        log.info("published candidate v%d (%s)", published[0].version, lineage)
        return published[0]

    def record_verdict(
        self,
        version: int,
        result: GateResult,
        weights_sha256: str,
        auto_promote: bool,
        on_inconclusive: OnInconclusive = "hold",
        actor: str = "gate",
        canary: dict[str, float] | None = None,
    ) -> tuple[RegistryState, str]:
        """The gate's verdict on `version`, which must hold the weights it judged; `result`'s
        outcome and reasons decide. With `canary` (GateConfig.canary_rule(), a share above 0),
        a passing candidate starts a canary instead of going live."""
        if self.registry.manifest(version).weights_sha256 != weights_sha256:
            raise RegistryError(
                f"the gate judged other weights than v{version} holds; its verdict is not recorded"
            )

        def decide(state: RegistryState) -> AuditEntry:
            _allowed("verdict", state, version)
            outcome, why = result.outcome, "; ".join(result.reasons)
            if outcome == "inconclusive" and on_inconclusive != "promote":
                action = "reject" if on_inconclusive == "reject" else "hold-inconclusive"
                reason = f"gate inconclusive: {why}"
            elif outcome == "reject":
                action, reason = "reject", why
            else:
                passed = (
                    "gate passed"
                    if outcome == "pass"
                    else f"gate inconclusive ({why}), taken as a pass"
                )
                if auto_promote and not state.pinned and canary and state.canary is None:
                    return AuditEntry(
                        actor=actor,
                        action="canary-start",
                        from_version=state.live,
                        to_version=version,
                        reason=f"{passed}; canary on {canary['share']:.0%} of users",
                        gate=result,
                        canary={**canary, "version": version, "against": state.live},
                    )
                if auto_promote and not state.pinned and not canary:
                    action, reason = "promote", passed
                else:
                    action = "await-operator"
                    reason = f"{passed}; " + (
                        "live is pinned"
                        if state.pinned
                        else "another canary is running"
                        if canary
                        else "auto_promote is off"
                    )
            return AuditEntry(
                actor=actor,
                action=action,
                from_version=state.live,
                to_version=version,
                reason=reason,
                gate=result,
            )

        state, entry = self._change(decide)
        return state, entry.action

    def promote(
        self, version: int, actor: str, reason: str = "", override: bool = False
    ) -> RegistryState:
        self._require(version)
        action = "promote-override" if override else "promote"

        def decide(state: RegistryState) -> AuditEntry:
            _allowed(action, state, version)
            return AuditEntry(
                actor=actor,
                action=action,
                from_version=state.live,
                to_version=version,
                reason=reason,
            )

        return self._change(decide)[0]

    def rollback(self, actor: str, to: int | None = None, reason: str = "") -> RegistryState:
        """Back to `to`, or to what was live when the current version was promoted (maybe the
        base model): repeated rollbacks walk back the chain of promotions."""
        if to is not None:
            self._require(to)

        def decide(state: RegistryState) -> AuditEntry:
            target = to
            if target is None:
                moves = [
                    e
                    for e in self.registry.audit_log()
                    if e.action in ("promote", "promote-override") and e.to_version == state.live
                ]
                if state.live is None or not moves:
                    raise RegistryError("nothing to roll back to: no earlier live version")
                target = moves[-1].from_version
            if target is not None:
                _allowed("rollback", state, target)
            elif state.live is None:
                raise RegistryError("base is already live")
            return AuditEntry(
                actor=actor,
                action="rollback",
                from_version=state.live,
                to_version=target,
                reason=reason,
            )

        return self._change(decide)[0]

    def reject(self, version: int, actor: str, reason: str) -> RegistryState:
        self._require(version)

        def decide(state: RegistryState) -> AuditEntry:
            if state.live == version:
                raise RegistryError(f"v{version} is live; roll back first")
            _allowed("reject", state, version)
            return AuditEntry(actor=actor, action="reject", to_version=version, reason=reason)

        return self._change(decide)[0]

    def start_canary(
        self, version: int, rule: dict[str, float], actor: str, reason: str = ""
    ) -> RegistryState:
        """`version` serves rule["share"] of the main alias's users beside live."""
        self._require(version)

        def decide(state: RegistryState) -> AuditEntry:
            if state.canary is not None:
                raise RegistryError(f"v{state.canary.version} is already a canary; stop it first")
            _allowed("canary-start", state, version)
            return AuditEntry(
                actor=actor,
                action="canary-start",
                from_version=state.live,
                to_version=version,
                reason=reason,
                canary={**rule, "version": version, "against": state.live},
            )

        return self._change(decide)[0]

    def extend_canary(self, max_ratings: int, actor: str, reason: str = "") -> RegistryState:
        """A later horizon: more ratings per arm before the rule calls it inconclusive."""

        def decide(state: RegistryState) -> AuditEntry:
            running = self._canary(state)
            if max_ratings <= running.max_ratings:
                raise RegistryError(
                    f"the canary's horizon is {running.max_ratings} ratings; extend beyond it"
                )
            return AuditEntry(
                actor=actor,
                action="canary-extend",
                to_version=running.version,
                reason=reason,
                canary={"max_ratings": max_ratings},
            )

        return self._change(decide)[0]

    def end_canary(
        self,
        outcome: Literal["promote", "rollback", "inconclusive", "stop"],
        actor: str,
        reason: str = "",
        evidence: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> RegistryState:
        """The canary's end, by its rule or an operator: promote (live), rollback (rejected),
        inconclusive (held for an operator), stop (a candidate again). `version`: end it only
        if that version is still the canary (the rule's evidence is about that one)."""
        action = {
            "promote": "promote",
            "rollback": "reject",
            "inconclusive": "hold-inconclusive",
            "stop": "canary-stop",
        }[outcome]

        def decide(state: RegistryState) -> AuditEntry:
            running = self._canary(state)
            if version is not None and running.version != version:
                raise RegistryError(f"v{version} is no longer the canary (v{running.version} is)")
            return AuditEntry(
                actor=actor,
                action=action,
                from_version=state.live,
                to_version=running.version,
                reason=reason or f"canary {outcome}",
                canary=evidence,
            )

        return self._change(decide)[0]

    @staticmethod
    def _canary(state: RegistryState):
        if state.canary is None:
            raise RegistryError("no canary is running")
        return state.canary

    def set_flag(self, action: FlagAction, actor: str, reason: str = "") -> RegistryState:
        FLAGS[action]  # noqa: B018 - a KeyError names an unknown action
        return self._change(
            lambda state: AuditEntry(
                actor=actor,
                action=action,
                from_version=state.live,
                to_version=state.live,
                reason=reason,
            )
        )[0]

    # -- the one path every change takes ---------------------------------------------------------
    def _change(
        self, decide: Callable[[RegistryState], AuditEntry]
    ) -> tuple[RegistryState, AuditEntry]:
        state, entry = self.registry.transact(decide)
        if self._announce is not None:
            self._announce(state, entry.actor, entry.action)
        return state, entry

    def _require(self, version: int) -> None:
        if version not in self.registry.versions():
            raise RegistryError(f"v{version} does not exist (versions: {self.registry.versions()})")


def announce(cfg, state: RegistryState, actor: str, action: str) -> None:
    """Tell every replica at once (best effort: replicas also poll the registry files)."""
    from shared.kafka import producer

    try:
        p = producer(cfg.kafka.bootstrap, max_block_ms=3000)
        p.send(
            cfg.kafka.adapters_topic,
            key=b"alias:live",
            value=json.dumps(
                {"live": state.live, "revision": state.revision, "actor": actor, "action": action}
            ).encode(),
        ).get(timeout=5)
        p.close(timeout=2)
    except Exception as exc:
        log.warning(
            "could not announce on %s (%s); replicas will see it on their next poll",
            cfg.kafka.adapters_topic,
            exc,
        )
