"""A learner on Kafka, fed what real clients and broken producers send. It must never stop: it
trains on what it can and says where the rest went, as an operator sees it: the dead-letter topic
(with a `reason` header) for records it cannot read, `dynalign_learner_records_skipped_total
{reason}` for readable ones it cannot train on, and the share-cap gauges while it waits for more
principals.

One broker, one server (two API keys = two principals) and one `dynalign learn` process serve the
module; each test looks at what changed. The learner takes 2 prompts per step with at most 1 per
principal (max_user_share 0.5), so every step needs two principals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kafka import KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from learner import checkpoint
from shared.config import KafkaConfig
from shared.kafka import EmbeddedBroker, consumer, ensure_topics, free_port
from shared.schemas import Choice, InteractionRecord, SamplingParams, Usage
from tests.conftest import API_KEY, ServerProcess, start_server

pytestmark = pytest.mark.slow

SECOND_KEY = "second-test-key"
TOPICS = KafkaConfig()


@dataclass
class Stack:
    broker: EmbeddedBroker
    server: ServerProcess
    learner: subprocess.Popen
    log: Path
    metrics_url: str
    workdir: Path

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the learner's /metrics; 0 for a series not exported yet."""
        text = httpx.get(self.metrics_url, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def not_trained(self) -> float:
        """Records dead-lettered or skipped, for any reason."""
        text = httpx.get(self.metrics_url, timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name
            in (
                "dynalign_learner_records_dead_lettered_total",
                "dynalign_learner_records_skipped_total",
            )
        )

    def eventually(self, condition, what: str, timeout_s: float = 180):
        """Poll `condition` (the learner's metrics move on their own schedule); fail naming
        `what`, or at once if the learner died."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.learner.poll() is None, (
                f"the learner died waiting for {what}:\n{self.log.read_text()[-4000:]}"
            )
            if result := condition():
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def produce(
        self, value: bytes | None, key: bytes | None = b"conversation", headers: list | None = None
    ) -> None:
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, max_request_size=4 << 20)
        try:
            producer.send(
                TOPICS.interactions_topic,
                key=key,
                value=value,
                headers=[("schema-version", b"2")] if headers is None else headers,
            ).get(timeout=30)
        finally:
            producer.close()

    def produce_raw(self, value: bytes, key: bytes, headers: list) -> None:
        """kafka-python's producer refuses a null header value, which the protocol (and the Java
        client) allows: build the record batch and send the ProduceRequest ourselves."""
        from kafka.net.compat import KafkaNetClient
        from kafka.protocol.producer import ProduceRequest
        from kafka.record import MemoryRecordsBuilder

        records = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
        records.append(timestamp=int(time.time() * 1000), key=key, value=value, headers=headers)
        records.close()
        topic = ProduceRequest.TopicProduceData
        request = ProduceRequest(
            transactional_id=None,
            acks=-1,
            timeout_ms=10_000,
            min_version=3,
            max_version=9,
            topic_data=[
                topic(
                    name=TOPICS.interactions_topic,
                    partition_data=[topic.PartitionProduceData(index=0, records=records.buffer())],
                )
            ],
        )
        client = KafkaNetClient(bootstrap_servers=self.broker.bootstrap)
        try:
            client.check_version()
            broker = next(iter(client.cluster.brokers())).node_id
            response = client.send_and_receive(broker, request)
            assert response.responses[0].partition_responses[0].error_code == 0, response
        finally:
            client.close()


def start_learner(work: Path, tiny_model: Path, bootstrap: str, metrics_port: int):
    env = {
        **os.environ,
        "DYNALIGN_MODEL__PATH": str(tiny_model),
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_KAFKA__BOOTSTRAP": bootstrap,
        # 2 prompts x 4 candidates per step, at most 1 prompt per principal, a checkpoint a step.
        "DYNALIGN_LEARNER__GROUP_SIZE": "4",
        "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "8",
        "DYNALIGN_LEARNER__MICRO_BATCH_COMPLETIONS": "8",
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
        "DYNALIGN_LEARNER__MAX_USER_SHARE": "0.5",
        "DYNALIGN_LEARNER__CHECKPOINT_EVERY_STEPS": "1",
        "DYNALIGN_LEARNER__METRICS_PORT": str(metrics_port),
        "DYNALIGN_LEARNER__CONSUMER_GROUP": f"records-{uuid.uuid4().hex[:6]}",
        "DYNALIGN_REGISTRY__STORE": str(work / "adapters"),
        "DYNALIGN_GATE__ENABLED": "false",
    }
    log = work / "learner.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dynalign", "learn", "--workdir", str(work / "learner")],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("records")
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        port = free_port()
        learner, log = start_learner(work, tiny_model, broker.bootstrap, port)
        server = None
        try:
            server = start_server(
                work,
                tiny_model,
                broker.bootstrap,
                env={"DYNALIGN_SERVING__API_KEYS": json.dumps([API_KEY, SECOND_KEY])},
            )
            stack = Stack(broker, server, learner, log, f"http://127.0.0.1:{port}/metrics", work)
            stack.eventually(lambda: "learner: metrics on" in log.read_text(), "the learner")
            yield stack
        finally:
            if server:
                server.stop()
            if learner.poll() is None:
                os.killpg(learner.pid, signal.SIGTERM)
                try:
                    learner.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(learner.pid, signal.SIGKILL)  # whatever of its group is left
            except ProcessLookupError:
                pass


def record(text: str, principal: str, messages: list | None = None) -> InteractionRecord:
    now = datetime.now(UTC)
    return InteractionRecord(
        conversation_id=uuid.uuid4().hex,
        created_at=now,
        served_at=now,
        model_alias="dynalign",
        adapter_version=None,
        user_hash=principal,
        principal_hash=principal,
        messages=messages or [{"role": "user", "content": text}],
        response=[Choice(index=0, content="ok", finish_reason="stop")],
        sampling=SamplingParams(max_tokens=4),
        usage=Usage(),
        latency_ms=1.0,
        ttft_ms=None,
        finish_reason="stop",
    )


def value(r: InteractionRecord) -> bytes:
    return r.model_dump_json().encode()


def steps(stack: Stack) -> float:
    return stack.metric("dynalign_learner_steps_total")


def dead_letters(bootstrap: str, tag: str, expected: int, timeout_s: float = 60) -> dict:
    """The dead-letter topic's records from this test: {test case: headers}."""
    c = consumer(bootstrap, group_id=None)
    partition = TopicPartition(TOPICS.dlq_topic, 0)
    c.assign([partition])
    c.seek_to_beginning(partition)
    found: dict[str, dict[str, bytes | None]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for message in batch:
                    headers = dict(message.headers)
                    case = (headers.get("test-case") or b"").decode()
                    if case.startswith(tag):
                        found[case.removeprefix(tag)] = headers
    finally:
        c.close()
    return found


# -- 1. OpenAI content parts ----------------------------------------------------------------------
def test_content_parts_from_the_openai_client_are_trained_on(stack, tiny_model):
    """Text parts in user and system turns are served (vLLM joins them with newlines) and the
    learner trains on them: the operator sees a step and nothing skipped or dead-lettered."""
    from openai import OpenAI

    tag = uuid.uuid4().hex[:6]
    conversations = {
        API_KEY: [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Plan a picnic {tag}"},
                    {"type": "text", "text": "for four people"},
                ],
            }
        ],
        SECOND_KEY: [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": f"Name a park {tag}"}]},
        ],
    }
    before, not_trained = steps(stack), stack.not_trained()
    usage = {}
    for key, messages in conversations.items():
        client = OpenAI(base_url=f"{stack.server.base_url}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="dynalign", messages=messages, max_tokens=4)
        usage[key] = reply.usage.prompt_tokens

    stack.eventually(lambda: steps(stack) >= before + 1, "a step on the content-parts chats")
    assert stack.not_trained() == not_trained

    # The learner renders the prompt the server served, token for token: one conversion.
    from transformers import AutoTokenizer

    from learner.grpo import prompt_ids
    from shared.chat import text_messages

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for key, messages in conversations.items():
        assert len(prompt_ids(tokenizer, text_messages(messages))) == usage[key]


# -- 1. poison records ----------------------------------------------------------------------------
def test_poison_records_never_stop_the_learner(stack, tiny_model):
    from transformers import AutoTokenizer

    from learner.grpo import prompt_ids
    from learner.rollout import judge_request

    tag = f"{uuid.uuid4().hex[:6]}:"
    # Within max_prompt_tokens (1024) as trained on, but the judge prompt around it (plus an
    # answer) does not fit the engine's max_model_len (1024).
    long_text = " ".join(f"{word}{i}" for i, word in enumerate(["alpha", "beta", "gamma"] * 30))
    long_prompt = [{"role": "user", "content": long_text}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(prompt_ids(tokenizer, long_prompt)) < 1024
    assert len(prompt_ids(tokenizer, judge_request(long_prompt, ""))) > 1024

    good = record(f"Plan a garden {tag}", "p")
    surrogate = value(good).replace(f"garden {tag}".encode(), b"garden \\ud800")
    image = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
        }
    ]
    roleless = [{"content": f"no role {tag}"}, {"role": "user", "content": f"Hi {tag}"}]
    poison = {
        # unreadable: to the dead-letter topic, with the reason the operator reads there
        "null value": (None, b"k"),
        "null key": (value(record(f"Keyless {tag}", "p")), None),
        "not json": (b"{not json", b"k"),
        "lone surrogate": (surrogate, b"k"),
        # unreadable, and too large for the dead-letter producer (1 MiB): skipped, counted
        "too large to dead-letter": (b"x" * (3 << 19), b"k"),
        # readable but unfit: skipped, counted by reason
        "too long": (value(record(long_text, "p")), b"k"),
        "image part": (value(record("", "p", image)), b"k"),
        "no role": (value(record("", "p", roleless)), b"k"),
    }
    skip_reasons = ("too_long_for_model", "non_text_content", "unrenderable", "dead_letter_failed")
    skipped = {
        r: stack.metric("dynalign_learner_records_skipped_total", reason=r) for r in skip_reasons
    }
    dead_lettered = stack.metric("dynalign_learner_records_dead_lettered_total")
    before = steps(stack)

    for case, (body, key) in poison.items():
        stack.produce(body, key, [("schema-version", b"2"), ("test-case", (tag + case).encode())])
    stack.produce_raw(
        value(record(f"Null header {tag}", "p")),
        b"k",
        [("schema-version", None), ("test-case", (tag + "null header").encode())],
    )
    for i in range(2):  # then good ones from two principals: two steps
        for principal in ("p", "q"):
            stack.produce(value(record(f"Plan a garden path {i} for {principal} {tag}", principal)))

    stack.eventually(lambda: steps(stack) >= before + 2, "two steps after the poison")
    dlq = dead_letters(stack.broker.bootstrap, tag, expected=5)
    reasons = {case: headers["reason"].decode() for case, headers in dlq.items()}
    assert reasons.keys() == {
        "null value",
        "null key",
        "null header",
        "not json",
        "lone surrogate",
    }, reasons
    assert reasons["null value"] == "null_value"
    assert reasons["null key"] == "null_key"
    assert reasons["null header"] == "unsupported_schema_version:missing"
    assert reasons["not json"].startswith("invalid_record")
    assert reasons["lone surrogate"].startswith("invalid_record")
    assert stack.metric("dynalign_learner_records_dead_lettered_total") == dead_lettered + 5
    for reason in skip_reasons:
        assert (
            stack.metric("dynalign_learner_records_skipped_total", reason=reason)
            == skipped[reason] + 1
        ), reason
    assert stack.learner.poll() is None


# -- 4. the per-principal share cap defers ------------------------------------------------------
def test_a_lone_principal_waits_for_another_and_loses_nothing(stack):
    tag = uuid.uuid4().hex[:6]
    before = steps(stack)
    log_start = len(stack.log.read_text())
    stack.produce(value(record(f"Plan a concert {tag} 1", "alone")))
    stack.produce(value(record(f"Plan a concert {tag} 2", "alone")))
    # One principal alone cannot fill a step: the learner says it waits, and why.
    stack.eventually(
        lambda: stack.metric("dynalign_learner_waiting_on_share_cap") == 1, "the share-cap gauge"
    )
    assert stack.metric("dynalign_learner_deferred_prompts") == 2
    assert steps(stack) == before
    assert stack.metric("dynalign_learner_records_skipped_total", reason="user_share") == 0

    # A second principal arrives: a step forms from the deferred prompt and the newcomer; the
    # other deferred prompt waits for the next step, kept in the checkpoint meanwhile.
    stack.produce(value(record(f"Plan a concert {tag} 3", "other")))
    stack.eventually(lambda: steps(stack) >= before + 1, "a step with the deferred prompt")
    assert stack.metric("dynalign_learner_waiting_on_share_cap") == 0
    assert stack.metric("dynalign_learner_deferred_prompts") == 1
    state = checkpoint.latest(stack.workdir / "learner")[1]
    assert [p.messages[0]["content"] for p in state.deferred] == [f"Plan a concert {tag} 2"]

    stack.produce(value(record(f"Plan a concert {tag} 4", "other")))
    stack.eventually(lambda: steps(stack) >= before + 2, "a step with the last deferred prompt")
    assert stack.metric("dynalign_learner_deferred_prompts") == 0
    log = stack.log.read_text()[log_start:]
    assert log.count("waiting for prompts from more principals") == 1, log[-3000:]  # not per poll
