"""Users' ratings: POST /v1/feedback with the interaction id an answer came with.

Pure checks of the ids first; then the official openai client against a real server (vLLM engine
inside) and a real broker, reading the ratings back from `dynalign.feedback`."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from serving.deps import Caller
from serving.feedback import (
    FeedbackRefused,
    FeedbackRequest,
    check_interaction_id,
    issue_interaction_id,
)
from shared.config import KafkaConfig
from shared.kafka import topic_specs
from shared.schemas import FeedbackRecord
from tests.conftest import API_KEY, OTHER_KEY, read_records

FEEDBACK_TOPIC = KafkaConfig().feedback_topic
SALT = b"salt"
ALICE, BOB = Caller("key:alice", authenticated=True), Caller("key:bob", authenticated=True)


def rate(interaction_id: str, choice: int = 0) -> FeedbackRequest:
    return FeedbackRequest(interaction_id=interaction_id, choice=choice, rating="up")


def test_an_interaction_id_names_its_version_and_only_its_key_may_rate_it():
    issued = issue_interaction_id(SALT, ALICE.principal, 3, 2)
    assert check_interaction_id(SALT, ALICE, rate(issued, choice=1)) == (3, 2)
    assert (
        check_interaction_id(SALT, ALICE, rate(issue_interaction_id(SALT, "key:alice", None, 1)))[0]
        is None
    )
    refusals = {
        "another key": (SALT, BOB, rate(issued)),
        "another deployment's salt": (b"other", ALICE, rate(issued)),
        "the version changed": (SALT, ALICE, rate(issued.replace(".v3.", ".v4."))),
        "more choices claimed": (SALT, ALICE, rate(issued.replace(".2.", ".9."))),
        "a choice it did not have": (SALT, ALICE, rate(issued, choice=2)),
        "not an interaction id": (SALT, ALICE, rate("chatcmpl-123")),
    }
    statuses = {}
    for case, args in refusals.items():
        with pytest.raises(FeedbackRefused) as refused:
            check_interaction_id(*args)
        statuses[case] = (refused.value.status, refused.value.param)
    assert statuses == {
        "another key": (403, "interaction_id"),
        "another deployment's salt": (403, "interaction_id"),
        "the version changed": (403, "interaction_id"),
        "more choices claimed": (403, "interaction_id"),
        "a choice it did not have": (400, "choice"),
        "not an interaction id": (400, "interaction_id"),
    }
    # An operator may rate any well-formed id, e.g. on a user's behalf from a support ticket.
    operator = Caller("operator:carol", operator="carol", authenticated=True)
    assert check_interaction_id(SALT, operator, rate(issued)) == (3, 2)


def test_ratings_are_one_per_rater_and_answer_on_a_compacted_topic():
    record = FeedbackRecord(
        interaction_id="i", choice=1, adapter_version=2, rater_hash="r", rating=5
    )
    assert record.rating_key == "i/1/r"
    assert topic_specs(KafkaConfig())[FEEDBACK_TOPIC]["configs"]["cleanup.policy"] == "compact"


# -- against a real server ----------------------------------------------------------------------
def chat(client: openai.OpenAI, text: str, **options) -> tuple[str | None, object]:
    """The official client's raw response: the answer and its interaction id header."""
    raw = client.chat.completions.with_raw_response.create(
        model="dynalign",
        messages=[{"role": "user", "content": text}],
        **{"temperature": 0, "max_tokens": 4, **options},
    )
    return raw.headers.get("x-dynalign-interaction-id"), raw.parse()


def send_feedback(client: openai.OpenAI, **body) -> dict:
    """The recipe README gives an app: the openai client's own POST, so keys, base URL, retries
    and typed errors are the chat's."""
    return client.post("/feedback", body=body, cast_to=object)


@pytest.mark.slow
def test_a_rating_is_logged_for_the_version_that_answered(client, server, broker):
    interaction, _ = chat(client, f"rate me {uuid.uuid4().hex[:6]}", n=2, temperature=1.0)
    assert interaction is not None
    before = server.metric_sum('dynalign_feedback_rating_count{adapter_version="base"}')
    first = send_feedback(client, interaction_id=interaction, choice=1, rating="up", tags=["kind"])
    assert first["object"] == "feedback" and first["rating"] == 5
    assert first["adapter_version"] is None  # the base model answered
    again = send_feedback(client, interaction_id=interaction, choice=1, rating=2, text="too short")
    found = read_records(
        broker.bootstrap, FEEDBACK_TOPIC, lambda r: r["interaction_id"] == interaction, 2
    )
    records = [FeedbackRecord.model_validate(r) for r, _ in found]
    assert [(r.id, r.rating, r.thumbs, r.choice) for r in records] == [
        (first["id"], 5, "up", 1),
        (again["id"], 2, None, 1),
    ]
    assert records[1].text == "too short" and records[0].tags == ["kind"]
    assert records[0].rater_hash == records[1].rater_hash and records[0].operator is None
    # The last rating wins: both carry one Kafka key, which compaction reduces to the last.
    assert {headers["record-id"] for _, headers in found} == {first["id"], again["id"]}
    assert server.metric_sum('dynalign_feedback_rating_count{adapter_version="base"}') == before + 2


@pytest.mark.slow
def test_only_the_key_that_was_answered_may_rate(client, server):
    interaction, _ = chat(client, "mine")
    other = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        send_feedback(other, interaction_id=interaction, rating="down")
    assert "only the key that made the request" in refused.value.message
    assert refused.value.body["param"] == "interaction_id"
    nobody = httpx.post(
        f"{server.base_url}/v1/feedback", json={"interaction_id": interaction, "rating": "up"}
    )
    assert nobody.status_code == 401 and "error" in nobody.json()


@pytest.mark.slow
def test_an_opted_out_answer_has_no_id_to_rate(client):
    interaction, answer = chat(client, "private", extra_headers={"X-Dynalign-No-Train": "true"})
    assert interaction is None
    with pytest.raises(openai.BadRequestError) as refused:  # what the client has instead
        send_feedback(client, interaction_id=answer.id, rating="up")
    assert "x-dynalign-interaction-id" in refused.value.message


@pytest.mark.slow
def test_bad_feedback_gets_openai_style_errors(client, server):
    interaction, _ = chat(client, "judge this")
    bad = {
        "rating out of range": {"rating": 7},
        "rating as a word": {"rating": "meh"},
        "unknown field": {"rating": "up", "stars": 3},
        "choice beyond n": {"rating": "up", "choice": 1},
    }
    for case, body in bad.items():
        r = httpx.post(
            f"{server.base_url}/v1/feedback",
            json={"interaction_id": interaction, **body},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert r.status_code == 400, case
        error = r.json()["error"]
        assert error["code"] == 400 and error["message"], case
    streamed = client.chat.completions.with_raw_response.create(
        model="dynalign",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=4,
        stream=True,
    )
    for _ in streamed.parse():
        pass
    # A streamed answer's id comes in the response headers, before the stream.
    assert (
        send_feedback(
            client, interaction_id=streamed.headers["x-dynalign-interaction-id"], rating=4
        )["rating"]
        == 4
    )
