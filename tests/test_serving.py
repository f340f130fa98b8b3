"""The chat server end to end: the official openai client over HTTP against a real dynalign
server process (vLLM engine inside), with interactions read back from a real Kafka-protocol
broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import openai
import pytest

from shared.config import KafkaConfig
from shared.schemas import InteractionRecord
from tests.conftest import API_KEY, read_records

pytestmark = pytest.mark.slow

TOPIC = KafkaConfig().interactions_topic
GREEDY = dict(temperature=0, max_tokens=16)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def conversation(tag: str) -> dict:
    """A fresh conversation id per test, so its records can be picked out of the shared topic."""
    return {"X-Dynalign-Conversation-Id": f"{tag}-{uuid.uuid4().hex[:8]}"}


def test_models_list_shows_alias_and_base(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["dynalign", "dynalign@base"]


def test_stream_concatenates_to_the_non_stream_text(client):
    for model in ("dynalign", "dynalign@base"):
        full = client.chat.completions.create(model=model, messages=ask("Plan my week"), **GREEDY)
        text = full.choices[0].message.content
        assert text and full.usage.completion_tokens == 16
        assert full.usage.total_tokens == full.usage.prompt_tokens + 16

        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=ask("Plan my week"),
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].usage.completion_tokens == 16  # usage arrives in the final chunk

    # Without include_usage the client sees no usage chunk (we ask vLLM for it internally).
    chunks = list(
        client.chat.completions.create(model="dynalign", messages=ask("hi"), stream=True, **GREEDY)
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_greedy_output_depends_on_the_prompt(client):
    a = client.chat.completions.create(model="dynalign", messages=ask("hello"), **GREEDY)
    b = client.chat.completions.create(model="dynalign", messages=ask("Plan a trip"), **GREEDY)
    assert a.choices[0].message.content != b.choices[0].message.content


def test_n_choices(client):
    out = client.chat.completions.create(
        model="dynalign", messages=ask("hi"), n=4, temperature=1.0, max_tokens=8, seed=1
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert 4 <= out.usage.completion_tokens <= 4 * 8


def test_stop_sequence_cuts_the_text(client):
    full = (
        client.chat.completions.create(
            model="dynalign", messages=ask("Plan my week"), temperature=0, max_tokens=32
        )
        .choices[0]
        .message.content
    )
    stop = full[6:9]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    cut = client.chat.completions.create(
        model="dynalign", messages=ask("Plan my week"), temperature=0, max_tokens=32, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_every_served_completion_is_logged_once_and_opt_outs_never(client, server, broker):
    logged = conversation("logged")
    opt_header = conversation("optout-header")
    opt_meta = conversation("optout-meta")

    plain = client.chat.completions.with_raw_response.create(
        model="dynalign",
        messages=ask("Plan a garden"),
        extra_headers=logged,
        user="alice",
        seed=7,
        stop=["zzz"],
        **GREEDY,
    )
    list(
        client.chat.completions.create(
            model="dynalign@base",
            messages=ask("Plan a garden")
            + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}],
            stream=True,
            extra_headers=logged,
            **GREEDY,
        )
    )
    client.chat.completions.create(
        model="dynalign",
        messages=ask("secret"),
        **GREEDY,
        extra_headers={**opt_header, "X-Dynalign-No-Train": "1"},
    )
    client.chat.completions.create(
        model="dynalign",
        messages=ask("secret"),
        **GREEDY,
        extra_headers=opt_meta,
        extra_body={"metadata": {"train": False}},
    )

    ids = {
        logged["X-Dynalign-Conversation-Id"],
        opt_header["X-Dynalign-Conversation-Id"],
        opt_meta["X-Dynalign-Conversation-Id"],
    }
    found = read_records(
        broker.bootstrap, TOPIC, lambda r: r["conversation_id"] in ids, expected=2, settle_s=1.0
    )
    assert server.metric("dynalign_outbox_depth_records") == 0
    records = [InteractionRecord.model_validate(r) for r, _ in found]  # every field, no extras
    assert [r.conversation_id for r in records] == [logged["X-Dynalign-Conversation-Id"]] * 2

    first = next(r for r in records if r.model_alias == "dynalign")
    assert first.id == plain.headers["x-dynalign-interaction-id"]
    assert first.adapter_version is None and first.messages == ask("Plan a garden")
    assert first.response[0].content == plain.parse().choices[0].message.content
    assert first.sampling.temperature == 0 and first.sampling.max_tokens == 16
    assert first.sampling.seed == 7 and first.sampling.stop == ["zzz"]
    assert first.usage.completion_tokens == 16 and first.finish_reason == "length"
    assert first.latency_ms > 0 and first.ttft_ms is None
    streamed = next(r for r in records if r.model_alias == "dynalign@base")
    assert len(streamed.messages) == 3 and streamed.ttft_ms is not None
    assert streamed.usage.completion_tokens == 16
    assert first.user_hash != streamed.user_hash  # "alice" vs the API key's identity
    headers = dict(found[0][1])
    assert headers["schema-version"] == "2" and headers["record-id"] == records[0].id


def test_dynalign_own_requests_are_never_logged(client, server, broker, tmp_path):
    """Evaluation, datagen and judging through the server must not become training data:
    every request dynalign itself sends carries the opt-out."""
    marker = uuid.uuid4().hex
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Held-out {marker} {i}"}) + "\n" for i in range(2))
    )
    served_before = server.metric_sum("dynalign_requests_total")

    def dynalign(command: str, *paths: str) -> None:
        # Not checked: the tiny model's 512-token context cannot hold the judge's and the
        # critic's prompts, so both runs stop there, after the requests this test is about.
        args = [*command.split(), "--base-url", f"{server.base_url}/v1", *paths, "--json"]
        subprocess.run(
            [sys.executable, "-m", "dynalign", *args],
            timeout=300,
            capture_output=True,
            env={**os.environ, "OPENAI_API_KEY": API_KEY},
        )

    dynalign(
        "eval pairwise --a dynalign --b dynalign@base --judge dynalign --max-tokens 4 "
        "--judge-max-tokens 2 --resamples 10",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "eval"),
    )
    dynalign(
        "datagen --model dynalign --num-goals 1 --max-refinements 0 --max-tokens 4 --no-progress",
        "--out",
        str(tmp_path / "datagen"),
    )
    # Both runs were answered: 2 prompts x 2 targets, and the first goal.
    assert server.metric_sum("dynalign_requests_total") >= served_before + 4 + 1

    # A chat sent afterwards is logged; once it is in the topic, nothing of the runs' is.
    after = conversation("after")
    client.chat.completions.create(
        model="dynalign", messages=ask("after"), extra_headers=after, **GREEDY
    )
    found = read_records(
        broker.bootstrap,
        TOPIC,
        lambda r: (
            r["conversation_id"] == after["X-Dynalign-Conversation-Id"]
            or marker in json.dumps(r)
            or "#Task Prompt#" in json.dumps(r)
        ),
        expected=1,
        settle_s=1.0,
    )
    assert [r["conversation_id"] for r, _ in found] == [after["X-Dynalign-Conversation-Id"]]


def test_bad_requests_get_openai_style_errors(client, server):
    url = f"{server.base_url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def post(body: bytes, headers=auth) -> httpx.Response:
        return httpx.post(url, content=body, headers=headers, timeout=30)

    cases = {
        "malformed JSON": (post(b'{"model": "dynalign", "messages": ['), 400),
        "missing messages": (post(b'{"model": "dynalign"}'), 400),
        # A UTF-16 byte-order mark on bytes that are not UTF-16: FastAPI's own 400.
        "undecodable body": (post(b'\xff\xfe{"model": "dynalign", "messages": []}'), 400),
        "unknown route": (httpx.post(f"{server.base_url}/v1/chat/complete", headers=auth), 404),
        "wrong method": (httpx.get(url, headers=auth), 405),
        "unknown model": (post(json.dumps({"model": "gpt-9", "messages": ask("x")}).encode()), 404),
        "oversized prompt": (
            post(json.dumps({"model": "dynalign", "messages": ask("word " * 2000)}).encode()),
            400,
        ),
        "oversized body": (
            post(json.dumps({"model": "dynalign", "messages": ask("x" * 300_000)}).encode()),
            400,
        ),
        "bad key": (
            post(
                json.dumps({"model": "dynalign", "messages": ask("x")}).encode(),
                {**auth, "Authorization": "Bearer wrong"},
            ),
            401,
        ),
        "no key": (
            post(
                json.dumps({"model": "dynalign", "messages": ask("x")}).encode(),
                {"Content-Type": "application/json"},
            ),
            401,
        ),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == status and error["message"], name

    # What an SDK user sees: typed exceptions with the server's message.
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=ask("x"))
    with pytest.raises(openai.BadRequestError, match="(?i)context|length|tokens"):
        client.chat.completions.create(model="dynalign", messages=ask("word " * 2000))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0
        ).chat.completions.create(model="dynalign", messages=ask("x"))
    # The server is still healthy after all that.
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_broker_outage_loses_nothing(client, server, broker):
    """Stop the broker, keep chatting and rating the answers, bring it back (empty: in-memory
    storage): every request succeeded and every interaction and rating arrives exactly once."""
    tag = conversation("outage")
    broker.stop()
    try:
        served = [
            client.chat.completions.with_raw_response.create(
                model="dynalign",
                messages=ask(f"q{i}"),
                extra_headers=tag,
                temperature=0,
                max_tokens=4,
            )
            for i in range(6)
        ]
        assert all(r.parse().choices[0].message.content is not None for r in served)
        interactions = [r.headers["x-dynalign-interaction-id"] for r in served]
        for interaction in interactions:
            client.post(
                "/feedback", body={"interaction_id": interaction, "rating": "up"}, cast_to=object
            )
        assert server.metric("dynalign_outbox_depth_records") >= 1
    finally:
        broker.start()
    found = read_records(
        broker.bootstrap,
        TOPIC,
        lambda r: r["conversation_id"] == tag["X-Dynalign-Conversation-Id"],
        expected=6,
        timeout_s=120,
        settle_s=2.0,
    )
    ids = [r["id"] for r, _ in found]
    assert len(ids) == 6 and len(set(ids)) == 6 and set(ids) == set(interactions)
    ratings = read_records(
        broker.bootstrap,
        KafkaConfig().feedback_topic,
        lambda r: r["interaction_id"] in ids,
        expected=6,
        timeout_s=60,
        settle_s=1.0,
    )
    assert sorted(r["interaction_id"] for r, _ in ratings) == sorted(ids)
    assert server.metric("dynalign_outbox_publish_errors_total") >= 1
