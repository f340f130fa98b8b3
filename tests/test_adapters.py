"""The adapter lifecycle on real components: versions in the registry, hot swaps in running
servers under load, refusals, operator routes and CLI, the gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared.config import KafkaConfig
from shared.files import file_sha256
from shared.kafka import EmbeddedBroker, ensure_topics
from shared.registry import MANIFEST, WEIGHTS, Registry
from tests.conftest import API_KEY, REPO, json_result, read_records, start_server
from tests.synthetic import publish_random

pytestmark = pytest.mark.slow

OPERATOR = "operator-token"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model):
    """A broker, a shared adapter store with two sound versions, and one server on them."""
    work = tmp_path_factory.mktemp("fleet")
    store = work / "adapters"
    registry = Registry(store)
    publish_random(registry, tiny_model, seed=1, scale=0.3)  # v1
    publish_random(registry, tiny_model, seed=2, scale=0.3)  # v2
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        env = {
            "DYNALIGN_REGISTRY__STORE": str(store),
            "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({"ops": OPERATOR}),
        }
        (work / "a").mkdir()
        server = start_server(work / "a", tiny_model, broker.bootstrap, env=env)
        try:
            yield work, registry, broker, server, env
        finally:
            server.stop()


def admin(server, path: str, token: str | None = OPERATOR, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.base_url}/admin{path}", json=body, headers=headers, timeout=60)


def ask(server, model: str = "dynalign", key: str = API_KEY) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Plan my week"}],
        },
    )


def served_version(server) -> str:
    return ask(server).headers["x-dynalign-adapter-version"]


def test_admin_routes_need_an_operator_token(fleet):
    _, registry, _, server, _ = fleet
    assert admin(server, "/pin", token=None).status_code == 401
    assert admin(server, "/pin", token="nonsense").status_code == 401
    refused = admin(server, "/pin", token=API_KEY)
    assert refused.status_code == 403 and "chat API key" in refused.json()["error"]["message"]
    listing = httpx.get(
        f"{server.base_url}/admin/adapters", headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert [v["version"] for v in listing.json()["versions"]] == registry.versions()


def test_swaps_under_load_fail_nothing_and_every_answer_names_its_version(fleet):
    work, registry, broker, server, _ = fleet
    seen: list[tuple[float, str, str, str]] = []  # (time, header version, model, record id)
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = ask(server)
                r.raise_for_status()
                seen.append(
                    (
                        time.monotonic(),
                        r.headers["x-dynalign-adapter-version"],
                        r.json()["model"],
                        r.headers.get("x-dynalign-interaction-id", ""),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(repr(exc))

    def switch(path: str, expect: str, **body) -> float:
        """Run an operator action; seconds until the first response from the new version."""
        start = time.monotonic()
        assert admin(server, path, **body).status_code == 200
        deadline = start + 10
        while time.monotonic() < deadline:
            if any(t >= start and v == expect for t, v, _, _ in seen):
                return min(t for t, v, _, _ in seen if t >= start and v == expect) - start
            time.sleep(0.02)  # polling the clients' results, not synchronising on time
        raise AssertionError(f"never saw version {expect}")

    # The fleet is shared: start from whatever is live and switch between the other two.
    live_before = registry.read_state().live
    first, second = (2, 1) if live_before == 1 else (1, 2)
    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        delays = [
            switch(f"/adapters/{first}/promote", str(first), reason="first"),
            switch(f"/adapters/{second}/promote", str(second), reason="better"),
            switch("/adapters/rollback", str(first), reason="it misbehaves"),
        ]
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert not failures
    assert all(d < 1.0 for d in delays), delays
    assert {v for _, v, _, _ in seen} >= {str(first), str(second)}
    for _, version, model, _ in seen:  # the body names the same version as the header
        assert model == ("dynalign" if version == "base" else f"dynalign-v{version}")
    # ... and so does every interaction record.
    by_id = {rid: version for _, version, _, rid in seen}
    records = read_records(
        broker.bootstrap,
        KafkaConfig().interactions_topic,
        lambda r: r["id"] in by_id,
        expected=len(by_id),
        timeout_s=60,
    )
    for record, _ in records:
        expected = by_id[record["id"]]
        assert str(record["adapter_version"] or "base") == expected

    audit = registry.audit_log()
    assert [(e.action, e.from_version, e.to_version) for e in audit[-3:]] == [
        ("promote", live_before, first),
        ("promote", first, second),
        ("rollback", second, first),
    ]
    assert (
        audit[-1].reason == "it misbehaves" and audit[-1].actor == "ops"
    )  # the name bound to the token


def _copy_version(registry: Registry, source: int, mutate) -> int:
    """A new version made from an existing one, then damaged by `mutate(dir)`."""
    staging = registry.root / f".test-{uuid.uuid4().hex}"
    shutil.copytree(registry.path(source), staging)
    version = max(registry.versions()) + 1
    manifest = json.loads((staging / MANIFEST).read_text())
    manifest["version"] = version
    (staging / MANIFEST).write_text(json.dumps(manifest))
    mutate(staging)
    staging.rename(registry.path(version))
    return version


def _rewrite_weights(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / WEIGHTS))
    save_file(change(tensors), str(directory / WEIGHTS))
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["weights_sha256"] = file_sha256(directory / WEIGHTS)  # consistent, but bad inside
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_bad_versions_are_refused_with_the_problem_named(fleet, tiny_model):
    _, registry, _, server, _ = fleet
    live_before = registry.read_state().live
    version_before = served_version(server)

    def corrupt(d: Path) -> None:
        (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:100])

    def nan(d: Path) -> None:
        def poison(t):
            key = next(iter(t))
            t[key][0, 0] = float("nan")
            return t

        _rewrite_weights(d, poison)

    def wrong_base(d: Path) -> None:
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["base_fingerprint"] = "0" * 64
        manifest["base_model"] = "some-other-model"
        (d / MANIFEST).write_text(json.dumps(manifest))

    cases = {"corrupt": corrupt, "NaN/Inf": nan, "another base model": wrong_base}
    for problem, mutate in cases.items():
        version = _copy_version(registry, 1, mutate)
        r = admin(server, f"/adapters/{version}/promote")
        assert r.status_code == 400, (problem, r.text)
        assert problem in r.json()["error"]["message"], r.json()
    over_rank = publish_random(registry, tiny_model, rank=32, seed=3).version  # engine max 16
    r = admin(server, f"/adapters/{over_rank}/promote")
    assert r.status_code == 400 and "rank 32 exceeds" in r.json()["error"]["message"]
    # An operator pinning a refused version gets the reason too, not a 500 (a chat key may
    # not pin a candidate at all).
    assert ask(server, f"dynalign@v{over_rank}").status_code == 403
    pinned = ask(server, f"dynalign@v{over_rank}", key=OPERATOR)
    assert pinned.status_code == 400 and "rank 32" in pinned.json()["error"]["message"]

    assert registry.read_state().live == live_before
    assert served_version(server) == version_before


def test_gate_rejects_an_exploding_candidate_and_accepts_a_sound_one(tmp_path, tiny_model):
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gate_run.py"), str(tiny_model), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json_result(out.stdout)
    assert state["versions"] == [1, 2]
    assert state["live"] == 1 and state["states"]["1"] == "live"
    # An essentially unchanged candidate: its answers score as live's, within the margin.
    unchanged = state["gate"]["1"]
    assert unchanged["outcome"] == "pass", unchanged
    assert -unchanged["score_margin"] < unchanged["score_diff_ci"][0] <= unchanged["score_diff"]
    assert 0 <= state["gate"]["1"]["ifeval_candidate"] <= 1  # the IFEval canary ran
    assert state["states"]["2"] == "rejected" and state["gate"]["2"]["outcome"] == "reject"
    reasons = state["gate"]["2"]["reasons"]
    assert any("KL to base" in r for r in reasons), reasons
