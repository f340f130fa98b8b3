"""The learner's rollouts and self-scores on a real `dynalign serve` (the shared server, tiny
model), through the operator-only rollout routes (serving/rollout.py, learner/served.py)."""

from __future__ import annotations

import math
import shutil

import httpx
import pytest
import torch

from learner.rollout import judge_request, judgeable
from learner.served import ServedEngine
from serving.rollout import MAX_ROLLOUT_ADAPTERS
from shared.config import DynalignConfig
from tests.conftest import API_KEY, LEARNER_TOKEN

HTTP = httpx.Client(timeout=120)  # a first request on a cold CPU engine takes seconds
CONVERSATIONS = [
    [{"role": "user", "content": "How should a town share one well?"}],
    [{"role": "user", "content": "Name a way to help a new neighbour."}],
]


def engine_for(server, model, tmp_path, endpoints: list[str] | None = None) -> ServedEngine:
    cfg = DynalignConfig(
        model={"path": str(model), "max_model_len": 512},
        learner={
            "rollout_endpoints": endpoints or [server.base_url],
            "rollout_token": LEARNER_TOKEN,
            "group_size": 3,
            "max_new_tokens": 8,
        },
        registry={"rollout_dir": str(server.data_dir / "rollout-adapters")},
    )
    return ServedEngine(cfg, tmp_path / "rollout")


@pytest.fixture(scope="module")
def hf(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tokenizer


def hf_digit_distribution(model, tokenizer, chat, digit_ids) -> list[float]:
    """The model's own next-token distribution over "0".."5", renormalised over them."""
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits[digit_ids], -1).tolist()


def random_adapter(model, path):
    """A LoRA adapter that changes the model's outputs (PEFT initialises B to zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(path)
    return peft_model


@pytest.mark.slow
def test_served_scores_are_the_models_digit_distribution(server, tmp_path, hf, tiny_model):
    model, tokenizer = hf
    engine = engine_for(server, tiny_model, tmp_path)
    # Short stand-ins for the judge's prompt, which is longer than this test server's 512.
    requests = [
        [{"role": "user", "content": f"Rate 0-5: {c[0]['content']} Answer: by turns."}]
        for c in CONVERSATIONS
    ]

    served = engine.token_distribution(requests, engine.digit_ids, None)
    for request, dist in zip(requests, served, strict=True):
        expected = hf_digit_distribution(model, tokenizer, request, engine.digit_ids)
        assert dist == pytest.approx(expected, abs=2e-4)

    peft_model = random_adapter(model, tmp_path / "adapter")
    lora = engine.lora_request(tmp_path / "adapter", "candidate")
    try:
        served = engine.token_distribution(requests, engine.digit_ids, lora)
        for request, dist in zip(requests, served, strict=True):
            expected = hf_digit_distribution(peft_model, tokenizer, request, engine.digit_ids)
            assert dist == pytest.approx(expected, abs=2e-4)
        # ... and the adapter really changed them: the check can tell the two apart.
        base = engine.token_distribution(requests, engine.digit_ids, None)
        changed = torch.tensor(served) - torch.tensor(base)
        assert changed.abs().max() > 1e-3
    finally:
        engine.drop(lora)
        peft_model.unload()


@pytest.mark.slow
def test_rollouts_are_groups_with_token_ids_and_never_logged(server, tmp_path, tiny_model):
    engine = engine_for(server, tiny_model, tmp_path)
    logged = server.metric_sum("dynalign_interactions_logged_total")
    requests = server.metric_sum("dynalign_requests_total")
    groups = engine.sample(CONVERSATIONS)
    assert [len(g) for g in groups] == [3, 3]
    for group in groups:
        for completion in group:
            assert 0 < len(completion.token_ids) <= 8
            decoded = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            # The random tiny model emits partial UTF-8 byte tokens, which vLLM's incremental
            # detokenizer and a whole decode may render as different replacement characters.
            if "\ufffd" not in decoded + completion.text:
                assert decoded == completion.text
    # Scored where the judge's prompt fits the engine (512 tokens here), None where not.
    scores = engine.self_scores(CONVERSATIONS, groups)
    for conversation, group, row in zip(CONVERSATIONS, groups, scores, strict=True):
        for completion, score in zip(group, row, strict=True):
            request = judge_request(conversation, completion.text)
            if judgeable(engine.tokenizer, [request], "expected", engine.max_model_len):
                assert 0 <= score <= 5
            else:
                assert score is None
    # Neither logged nor counted as users' requests; a user's chat now is both.
    assert server.metric_sum("dynalign_interactions_logged_total") == logged
    assert server.metric_sum("dynalign_requests_total") == requests
    HTTP.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "dynalign", "messages": CONVERSATIONS[0], "max_tokens": 2},
    ).raise_for_status()
    assert server.metric_sum("dynalign_requests_total") == requests + 1


@pytest.mark.slow
def test_rollout_routes_are_operators_only_and_names_are_never_reused(server, tmp_path, hf):
    model, _ = hf
    routes = f"{server.base_url}/admin/rollout"
    user = {"Authorization": f"Bearer {API_KEY}"}
    learner = {"Authorization": f"Bearer {LEARNER_TOKEN}"}
    body = {"model": "dynalign", "messages": CONVERSATIONS[0], "max_tokens": 1}
    # A chat key is refused (403) and nobody else gets in (401), with OpenAI-style bodies.
    refused = HTTP.post(f"{routes}/v1/chat/completions", json=body, headers=user)
    assert refused.status_code == 403
    assert "operator" in refused.json()["error"]["message"].lower()
    assert HTTP.post(f"{routes}/v1/chat/completions", json=body).status_code == 401

    name = "rollout-test-once"
    peft_model = random_adapter(model, server.data_dir / "rollout-adapters" / name)
    peft_model.unload()
    loaded = HTTP.put(f"{routes}/adapters/{name}", headers=learner)
    assert loaded.status_code == 204, loaded.text
    # Users cannot reach a rollout adapter by its name.
    as_user = HTTP.post(
        f"{server.base_url}/v1/chat/completions", json={**body, "model": name}, headers=user
    )
    assert as_user.status_code == 404
    assert HTTP.delete(f"{routes}/adapters/{name}", headers=learner).status_code == 204
    again = HTTP.put(f"{routes}/adapters/{name}", headers=learner)
    assert again.status_code == 409 and "never reused" in again.json()["error"]["message"]
    # An evicted name is gone: a request for it is refused, never answered by the base model.
    gone = HTTP.post(f"{routes}/v1/chat/completions", json={**body, "model": name}, headers=learner)
    assert gone.status_code == 404
    # Paths are never taken from the request.
    assert HTTP.put(f"{routes}/adapters/..%2Fadapters", headers=learner).status_code in (400, 404)


@pytest.mark.slow
def test_a_dead_endpoint_costs_a_retry_on_the_next(server, tmp_path, tiny_model):
    from shared.kafka import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    engine = engine_for(server, tiny_model, tmp_path, endpoints=[dead, server.base_url])
    assert engine.failovers == 1  # the model length was asked of the live one
    groups = engine.sample(CONVERSATIONS[:1])
    assert len(groups[0]) == 3


@pytest.mark.slow
def test_users_logprobs_are_vllms_raw_logprobs(server, hf):
    """What the learner needs (priority scheduling, rollout routes) leaves users' requests as
    vLLM's server answers them: raw log-probs of the full vocabulary."""
    model, tokenizer = hf
    chat = CONVERSATIONS[1]
    response = HTTP.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": "dynalign",
            "messages": chat,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ).json()
    top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    best = logp.topk(3)
    assert [t["logprob"] for t in top] == pytest.approx(best.values.tolist(), abs=2e-4)
    assert math.isclose(
        sum(math.exp(t["logprob"]) for t in top), best.values.exp().sum(), rel_tol=1e-3
    )
    refused = HTTP.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "dynalign", "messages": chat, "max_tokens": 1, "priority": -1},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"


@pytest.mark.slow
def test_a_restarted_learner_evicts_the_adapters_its_dead_session_left(server, hf):
    """A learner killed mid-step (or restarted by `up`'s supervisor) never evicted what it
    loaded; its successor, a new session, takes those slots, oldest first. One session that
    fills every slot itself is still refused (429): its own leak."""
    model, _ = hf
    routes = f"{server.base_url}/admin/rollout"
    learner = {"Authorization": f"Bearer {LEARNER_TOKEN}"}
    peft_model = random_adapter(model, server.data_dir / "rollout-adapters" / "rollout-dead-0")
    peft_model.unload()
    source = server.data_dir / "rollout-adapters" / "rollout-dead-0"
    names = [f"rollout-dead-{i}" for i in range(MAX_ROLLOUT_ADAPTERS)]
    names += [f"rollout-alive-{i}" for i in range(MAX_ROLLOUT_ADAPTERS + 1)]
    for name in names[1:]:
        shutil.copytree(source, server.data_dir / "rollout-adapters" / name)
    for name in names[:MAX_ROLLOUT_ADAPTERS]:
        assert HTTP.put(f"{routes}/adapters/{name}", headers=learner).status_code == 204
    body = {"messages": CONVERSATIONS[0], "max_tokens": 1}

    def answers(name: str) -> int:
        chat = HTTP.post(
            f"{routes}/v1/chat/completions", json={**body, "model": name}, headers=learner
        )
        return chat.status_code

    try:
        alive = names[MAX_ROLLOUT_ADAPTERS:]
        assert HTTP.put(f"{routes}/adapters/{alive[0]}", headers=learner).status_code == 204
        assert answers("rollout-dead-0") == 404 and answers("rollout-dead-1") == 200
        for name in alive[1:MAX_ROLLOUT_ADAPTERS]:
            assert HTTP.put(f"{routes}/adapters/{name}", headers=learner).status_code == 204
        full = HTTP.put(f"{routes}/adapters/{alive[-1]}", headers=learner)
        assert full.status_code == 429 and "evict one first" in full.json()["error"]["message"]
    finally:
        for name in names:
            HTTP.delete(f"{routes}/adapters/{name}", headers=learner)
