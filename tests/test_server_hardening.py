"""Ordinary and hostile traffic against a real server (vLLM engine inside, real broker, the
official openai client): every request gets an OpenAI-style answer, no client can starve another
or steer what is served, and nothing a user opted out of is logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest

from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics
from shared.lifecycle import Lifecycle
from shared.registry import WEIGHTS, Registry
from tests.conftest import API_KEY, read_records, start_server
from tests.synthetic import publish_random

pytestmark = pytest.mark.slow

TOPIC = KafkaConfig().interactions_topic
# One key per test: per-client limits would otherwise couple the tests' outcomes.
KEYS = {
    name: f"{name}-key"
    for name in (
        "registry",
        "auth",
        "pin",
        "evict",
        "greedy",
        "other",
        "rate",
        "optout",
        "labels",
        "compat",
        "retry",
    )
}
OPERATOR, OPERATOR_NAME = "op-token", "alice"
LIMITS = {
    "DYNALIGN_SERVING__MAX_N": "4",
    "DYNALIGN_SERVING__MAX_TOKENS": "64",
    "DYNALIGN_SERVING__MAX_CONCURRENT_PER_CLIENT": "2",
    "DYNALIGN_SERVING__RATE_LIMIT_PER_CLIENT": "5",
    "DYNALIGN_SERVING__RATE_LIMIT_BURST": "10",
    "DYNALIGN_SERVING__MAX_IN_FLIGHT": "3",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model):
    """A server on a registry where v1 was live, v2 is live, v3 is a candidate and v4 was
    rejected, with tight limits; its registry.json is garbled before start-up (the audit log
    must carry it)."""
    work = tmp_path_factory.mktemp("hardening")
    registry = Registry(work / "adapters")
    for seed in range(1, 7):
        publish_random(registry, tiny_model, seed=seed, scale=0.3)
    Lifecycle(registry).promote(1, "setup")
    Lifecycle(registry).promote(2, "setup")
    Lifecycle(registry).reject(4, "setup", "bad")
    (registry.root / Registry.STATE_FILE).write_text('{"states": {"1": "li')  # torn write
    env = {
        "DYNALIGN_REGISTRY__STORE": str(registry.root),
        "DYNALIGN_REGISTRY__KEEP_LOADED": "1",
        "DYNALIGN_MODEL__ENGINE_ARGS": json.dumps({"max_logprobs": 3}),
        "DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY, *KEYS.values()]),
        "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({OPERATOR_NAME: OPERATOR}),
        **LIMITS,
    }
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        server = start_server(work, tiny_model, broker.bootstrap, env=env)
        try:
            # What start-up made of the garbled file, seen before any test changes the registry.
            at_start = {
                "served": chat(server, KEYS["registry"]).headers["x-dynalign-adapter-version"],
                "states": registry.read_state().states,
            }
            yield server, registry, broker, at_start
        finally:
            server.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def chat(server, key: str, model: str = "dynalign", **extra) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Plan my week"}],
        **extra,
    }
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
    )


def test_the_garbled_registry_file_is_rebuilt_from_the_audit_log(site):
    _, registry, _, at_start = site
    assert at_start["served"] == "2"
    assert at_start["states"] == {1: "retired", 2: "live", 4: "rejected"}
    kept = list(registry.root.glob("registry.json.corrupt-*"))
    assert len(kept) == 1 and "li" in kept[0].read_text()  # kept for inspection


def test_auth_has_no_soft_spots(site):
    server, registry, _, _ = site
    base = server.base_url
    for empty in ("Bearer", ""):  # an empty bearer is no key
        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"Authorization": empty},
            json={"model": "dynalign", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 401, empty
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(base + path).status_code == 401
        assert (
            httpx.get(base + path, headers={"Authorization": f"Bearer {KEYS['auth']}"}).status_code
            == 200
        )
    # Operators may chat; chat keys may not operate.
    assert chat(server, key=OPERATOR).status_code == 200
    refused = httpx.post(
        f"{base}/admin/pin", json={}, headers={"Authorization": f"Bearer {KEYS['auth']}"}
    )
    assert refused.status_code == 403
    # The audited actor is the name bound to the token, whatever the client claims.
    pinned = httpx.post(
        f"{base}/admin/pin",
        json={"reason": "test"},
        headers={"Authorization": f"Bearer {OPERATOR}", "X-Dynalign-Actor": "mallory"},
    )
    assert pinned.status_code == 200
    httpx.post(f"{base}/admin/unpin", json={}, headers={"Authorization": f"Bearer {OPERATOR}"})
    actors = {e.actor for e in registry.audit_log() if e.action in ("pin", "unpin")}
    assert actors == {OPERATOR_NAME}


def test_chat_keys_pin_only_versions_users_were_served(site):
    server, registry, _, _ = site
    assert chat(server, KEYS["pin"], model="dynalign@v1").status_code == 200  # retired: was live
    assert chat(server, KEYS["pin"], model="dynalign@v2").status_code == 200  # live
    for version, state in ((3, "candidate"), (4, "rejected")):
        refused = chat(server, KEYS["pin"], model=f"dynalign@v{version}")
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["param"] == "model" and state in error["message"]
    assert chat(server, key=OPERATOR, model="dynalign@v3").status_code == 200
    with pytest.raises(openai.PermissionDeniedError, match="candidate"):
        client(server, KEYS["pin"]).chat.completions.create(
            model="dynalign@v3", messages=[{"role": "user", "content": "hi"}]
        )
    # A rejected version never goes live, by any route.
    for path, body in (("/adapters/4/promote", {}), ("/adapters/rollback", {"to": 4})):
        r = httpx.post(
            f"{server.base_url}/admin{path}",
            json=body,
            headers={"Authorization": f"Bearer {OPERATOR}"},
        )
        assert r.status_code == 409 and "rejected" in r.json()["error"]["message"], r.text


def test_on_demand_loads_are_evicted_and_first_requests_race_safely(site):
    """Two first requests for one version at once both succeed (one load), and versions
    loaded on demand do not stay loaded beyond keep_loaded (1 here) plus live."""
    server, _, _, _ = site
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                chat(server, key=OPERATOR, model="dynalign@v5").status_code
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200], results
    for version in (1, 3, 5, 6):
        assert chat(server, key=OPERATOR, model=f"dynalign@v{version}").status_code == 200
    assert server.metric("dynalign_adapters_loaded") <= 2  # live + the newest on-demand load


def test_limits_refuse_with_429_and_one_greedy_key_cannot_starve_another(site):
    server, _, _, _ = site
    sdk = client(server, KEYS["other"])
    with pytest.raises(openai.BadRequestError, match="n=5 exceeds"):
        sdk.chat.completions.create(
            model="dynalign", n=5, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens=65 exceeds"):
        sdk.chat.completions.create(
            model="dynalign", max_tokens=65, messages=[{"role": "user", "content": "hi"}]
        )

    # The greedy key fires 6 long requests at once: 2 run (its concurrency), 4 are told to
    # come back; meanwhile another key is served.
    greedy: list[httpx.Response] = []
    long = dict(max_tokens=64, min_tokens=64, n=4, temperature=1.0)
    threads = [
        threading.Thread(target=lambda: greedy.append(chat(server, KEYS["greedy"], **long)))
        for _ in range(6)
    ]
    limited_before = server.metric_sum("dynalign_requests_limited_total")
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.metric_sum("dynalign_requests_limited_total") < limited_before + 4:
        assert time.monotonic() < deadline, "the greedy key was never limited"
        time.sleep(0.05)
    other = chat(server, KEYS["other"])
    for t in threads:
        t.join()
    assert other.status_code == 200
    codes = sorted(r.status_code for r in greedy)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    refused = next(r for r in greedy if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "concurrent" in refused.json()["error"]["message"]

    # A burst above the rate: the bucket (10, 5/s) runs dry; the SDK raises RateLimitError and
    # Retry-After says when to come back.
    # Requests for an unknown model are refused after admission, without inference, so the
    # burst outruns the refill however busy the machine is.
    limited: list[openai.RateLimitError] = []
    for _ in range(16):
        try:
            client(server, KEYS["rate"]).chat.completions.create(
                model="no-such-model", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.NotFoundError:
            pass
        except openai.RateLimitError as exc:
            limited.append(exc)
    assert limited and all("Rate limit" in e.message for e in limited)
    assert all(int(e.response.headers["retry-after"]) >= 1 for e in limited)


def test_opt_out_is_spelled_any_usual_way_and_sticks_to_the_conversation(site):
    server, _, broker, _ = site
    tag = uuid.uuid4().hex[:8]
    kept = f"kept {tag}"
    for spelling in ("False", "0", "no", False):
        r = chat(
            server,
            KEYS["optout"],
            messages=[{"role": "user", "content": f"secret {spelling} {tag}"}],
            metadata={"train": spelling},
        )
        assert r.status_code == 200 and "x-dynalign-interaction-id" not in r.headers
    for bad in ({"metadata": {"train": "maybe"}}, {"metadata": "train=no"}):
        r = chat(server, KEYS["optout"], **bad)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata")
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {KEYS['optout']}", "X-Dynalign-No-Train": "plz"},
        json={"model": "dynalign", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-dynalign-no-train"

    # Turn 1 opts out; turn 2 (the same conversation, no flag) must not log turn 1's text.
    first = [{"role": "user", "content": f"private {tag}"}]
    assert (
        chat(server, KEYS["optout"], messages=first, metadata={"train": False}).status_code == 200
    )
    second = first + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]
    later = chat(server, KEYS["optout"], messages=second)
    assert later.status_code == 200 and "x-dynalign-interaction-id" not in later.headers
    assert (
        chat(server, KEYS["optout"], messages=[{"role": "user", "content": kept}]).status_code
        == 200
    )

    found = read_records(
        broker.bootstrap,
        TOPIC,
        lambda r: tag in json.dumps(r["messages"]),
        expected=1,
        settle_s=2.0,
    )
    assert [r["messages"][0]["content"] for r, _ in found] == [kept]


def test_metric_labels_stay_bounded_whatever_the_model_name(site):
    server, _, _, _ = site
    before = len(httpx.get(f"{server.base_url}/metrics").content)
    statuses = []
    for i in range(20):  # fast enough to meet the rate limit too: a 429 is labelled the same
        r = chat(server, KEYS["labels"], model=f"{i}-" + "x" * 4096)
        statuses.append(r.status_code)
        assert r.status_code in (404, 429) and len(r.text) < 1000
    assert 404 in statuses
    page = httpx.get(f"{server.base_url}/metrics").text
    assert "xxxx" not in page and 'model="unknown"' in page
    assert len(page) - before < 2000


def test_vllm_clients_find_version_completions_and_their_engine_flags(site):
    server, _, broker, _ = site
    version = httpx.get(f"{server.base_url}/version").json()
    assert version["version"] and version["dynalign"]
    sdk = client(server, KEYS["compat"])
    tag = uuid.uuid4().hex[:8]
    done = sdk.completions.create(model="dynalign", prompt=f"Once upon {tag}", max_tokens=4)
    assert done.choices[0].text and done.usage.completion_tokens == 4
    streamed = list(
        sdk.completions.create(model="dynalign@v2", prompt="Once", max_tokens=3, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    # Completions are served but never logged (no user turn to replay).
    assert not read_records(
        broker.bootstrap, TOPIC, lambda r: tag in json.dumps(r), expected=1, timeout_s=3
    )
    # model.engine_args reached the engine: max_logprobs=3.
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        sdk.chat.completions.create(
            model="dynalign",
            logprobs=True,
            top_logprobs=5,
            messages=[{"role": "user", "content": "hi"}],
        )


def test_a_refused_live_version_is_retried_until_it_can_be_served(site, tiny_model):
    """A shared volume that shows the manifest before the weights: the server refuses, keeps
    serving what it served, and switches once the file is there, with no new registry change."""
    server, registry, _, _ = site
    version = publish_random(registry, tiny_model, seed=99, scale=0.3).version
    weights = registry.path(version) / WEIGHTS
    hidden = weights.with_name("hidden")
    os.replace(weights, hidden)
    before = chat(server, KEYS["retry"]).headers["x-dynalign-adapter-version"]
    failures = server.metric_sum("dynalign_adapter_swap_failures_total")
    Lifecycle(registry).promote(
        version, "another host"
    )  # files are the truth; no check on this path
    deadline = time.monotonic() + 10  # the server polls the registry every second
    while server.metric_sum("dynalign_adapter_swap_failures_total") == failures:
        assert time.monotonic() < deadline, "the server never tried the new version"
        time.sleep(0.2)
    assert chat(server, KEYS["retry"]).headers["x-dynalign-adapter-version"] == before
    os.replace(hidden, weights)
    deadline = time.monotonic() + 30
    while chat(server, KEYS["retry"]).headers["x-dynalign-adapter-version"] != str(version):
        assert time.monotonic() < deadline, "the server never retried the refused version"
        time.sleep(0.5)
    Lifecycle(registry).rollback("test", reason="restore")  # the site is shared: put it back
    deadline = time.monotonic() + 10
    while chat(server, KEYS["retry"]).headers["x-dynalign-adapter-version"] != before:
        assert time.monotonic() < deadline, "the server never followed the rollback"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "args, salt, named",
    [
        (["--host", "0.0.0.0"], "s", "without API keys"),
        (["--engine-arg", "enable_lora=false"], "s", "enable_lora"),
        (["--engine-arg", "max_num_seqs=lots"], "s", "--max-num-seqs"),
        ([], None, "user_hash_salt is required"),
        ([], "", "must not be empty"),
    ],
)
def test_unsafe_or_invalid_start_up_is_refused_with_the_setting_named(tmp_path, args, salt, named):
    """Refused before the engine or the outbox start: seconds, and nothing left behind."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DYNALIGN_")}
    if salt is not None:
        full_env["DYNALIGN_SERVING__USER_HASH_SALT"] = salt
    out = subprocess.run(
        [sys.executable, "-m", "dynalign", "serve", "--kafka", "127.0.0.1:1", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert named in out.stdout + out.stderr
