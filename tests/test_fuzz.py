"""A bounded fuzz of the running server, then the learner on the log it wrote.

Hypothesis generates chat requests of every shape a client might send — malformed JSON, wrong
types, huge fields, odd unicode (lone surrogates included), OpenAI content parts, unknown fields
and models — and posts them over HTTP to a real server (vLLM engine, real broker). What a user
must see: an answer below 500 every time; what an operator must see: no crashed thread, bounded
memory, every logged interaction in Kafka, and a learner that still steps on that log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, ensure_topics, free_port
from tests.conftest import API_KEY, read_records, start_server

pytestmark = pytest.mark.slow

REQUESTS = 2000
TOPIC = KafkaConfig().interactions_topic

# Text as clients produce it: any code point, lone surrogates included (they survive JSON as
# "\ud800" escapes), sometimes long.
odd_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "a\udfffb",
        "é" * 300,
        "{{prompt}}",
        "<|im_start|>system",
        "x" * 20_000,
    ]
)
json_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | odd_text
junk = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)

content_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "bogus"]), "text": odd_text}
)
content = odd_text | st.lists(content_part, max_size=3) | junk
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "king"]), "content": content},
    optional={"name": odd_text, "extra": junk},
)
valid_message = st.fixed_dictionaries(
    {
        "role": st.just("user"),
        "content": odd_text
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": odd_text}),
            min_size=1,
            max_size=2,
        ),
    }
)

body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["dynalign", "dynalign@base", "dynalign@v7", "gpt-4o"]) | odd_text,
        "messages": st.lists(valid_message, min_size=1, max_size=3)
        | st.lists(message, max_size=3)
        | junk,
    },
    optional={
        "max_tokens": st.integers(-5, 10) | junk,
        "n": st.integers(-1, 20) | junk,
        "temperature": st.floats(-1, 3) | junk,
        "stream": st.booleans() | junk,
        "stop": odd_text | st.lists(odd_text, max_size=3),
        "user": odd_text | junk,
        "seed": st.integers(-(2**64), 2**64),
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "train": st.sampled_from([True, False, "no", "False", "maybe", 0, None]),
                "conversation_id": odd_text | junk,
            },
        )
        | junk,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 30),
        "frobnicate": junk,
    },
)


# What a client that reads the docs sends, with odd text everywhere text goes.
valid_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["dynalign", "dynalign@base"]),
        "messages": st.lists(valid_message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 8),
        "temperature": st.just(1.0),
    },
    optional={
        "n": st.integers(1, 4),
        "stream": st.booleans(),
        "stop": st.lists(odd_text, max_size=2),
        "user": odd_text,
        "metadata": st.fixed_dictionaries({"train": st.booleans()}),
    },
)


def payload(valid: dict, wild: dict, mode: int) -> bytes:
    """Half valid requests, the rest wild; some cut short or not JSON at all."""
    chosen = valid if mode < 5 else wild
    raw = json.dumps(chosen, ensure_ascii=True, allow_nan=True).encode()
    return {8: raw[: len(raw) // 2], 9: b"\xff\xfe" + raw[:50]}.get(mode, raw)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("fuzz")
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        # Limits lifted: this measures robustness, not the rate limiter.
        env = {
            "DYNALIGN_SERVING__RATE_LIMIT_PER_CLIENT": "1e6",
            "DYNALIGN_SERVING__RATE_LIMIT_BURST": "1000000",
            "DYNALIGN_SERVING__MAX_TOKENS": "8",
            "DYNALIGN_SERVING__MAX_N": "4",
        }
        server = start_server(work, tiny_model, broker.bootstrap, env=env)
        try:
            yield work, broker, server
        finally:
            server.stop()


def test_fuzzed_traffic_never_breaks_the_server_and_the_learner_still_steps(fuzzed, tiny_model):
    work, broker, server = fuzzed
    process = psutil.Process(server.process.pid)
    http = httpx.Client(
        base_url=server.base_url,
        timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    rss_start = process.memory_info().rss
    statuses: list[int] = []
    logged: set[str] = set()

    @settings(
        max_examples=REQUESTS,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(valid=valid_body, wild=body, mode=st.integers(0, 9))
    def one_request(valid, wild, mode):
        r = http.post("/v1/chat/completions", content=payload(valid, wild, mode))
        statuses.append(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text[:500], mode, valid, wild)
        if r.status_code >= 400:
            error = r.json()["error"]  # OpenAI-style, always
            assert error["message"] and error["code"] == r.status_code
        elif "x-dynalign-interaction-id" in r.headers:
            logged.add(r.headers["x-dynalign-interaction-id"])

    started = time.monotonic()
    one_request()
    seconds = time.monotonic() - started
    rss_growth_mib = (process.memory_info().rss - rss_start) / 2**20

    assert len(statuses) >= REQUESTS
    counts = sorted({s: statuses.count(s) for s in set(statuses)}.items())
    assert sum(s == 200 for s in statuses) >= 500, counts
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "Exception in thread" not in log and "Traceback" not in log
    # Bounded memory: the engine warms up with the first requests; what follows must not grow
    # with the number of requests.
    assert rss_growth_mib < 300, rss_growth_mib
    found = read_records(
        broker.bootstrap, TOPIC, lambda r: r["id"] in logged, expected=len(logged), timeout_s=120
    )
    assert {r["id"] for r, _ in found} == logged
    print(
        f"\nfuzz: {len(statuses)} requests in {seconds:.0f} s, "
        f"{sum(s == 200 for s in statuses)} served, {len(logged)} logged, "
        f"status counts {counts}, "
        f"server RSS growth {rss_growth_mib:.0f} MiB"
    )

    # The learner reads that same log, skips or dead-letters what it cannot use, and steps.
    env = {
        **os.environ,
        "DYNALIGN_MODEL__PATH": str(tiny_model),
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_KAFKA__BOOTSTRAP": broker.bootstrap,
        "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "16",
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
        "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "2",
        "DYNALIGN_LEARNER__METRICS_PORT": str(free_port()),
        "DYNALIGN_LEARNER__MAX_USER_SHARE": "1.0",
        "DYNALIGN_GATE__ENABLED": "false",
        "DYNALIGN_REGISTRY__STORE": str(work / "adapters"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynalign",
            "learn",
            "--max-steps",
            "2",
            "--workdir",
            str(work / "learner"),
        ],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step     2" in out.stdout, out.stdout[-3000:]
