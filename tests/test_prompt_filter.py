"""Turning interaction records into training prompts, and where reading resumes: pure logic and
the tiny model's tokenizer, no engine, no broker."""

import pytest

from learner import metrics
from learner.consumer import (
    PromptFilter,
    TrainingPrompt,
    Unusable,
    start_offset,
    training_messages,
)
from shared.config import LearnerConfig


def prompt(record_id: str, text: str, user: str = "u1") -> TrainingPrompt:
    return TrainingPrompt(record_id, user, [{"role": "user", "content": text}])


def fits_anything(messages) -> None:
    pass


def test_training_prompt_is_the_conversation_up_to_the_last_user_turn():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Plan a trip"},
        {"role": "assistant", "content": "Where to?"},
        {"role": "user", "content": "Lisbon"},
        {"role": "assistant", "content": "Day 1 ..."},
    ]
    assert training_messages(messages) == messages[:4]  # the user's own system prompt kept


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "assistant", "content": "hi"}], "no_user_turn"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "non_text_content",
        ),
        (
            [
                {"role": "system", "content": [{"type": "input_audio", "input_audio": {}}]},
                {"role": "user", "content": "hi"},
            ],
            "non_text_content",
        ),
        ([{"role": "user", "content": {"text": "a dict is no content"}}], "non_text_content"),
        ([{"role": "user", "content": None}], "empty_prompt"),
        ([{"role": "user", "content": [{"type": "text", "text": " "}]}], "empty_prompt"),
    ],
)
def test_unusable_conversations_are_named(messages, reason):
    with pytest.raises(Unusable) as info:
        training_messages(messages)
    assert info.value.reason == reason


def test_text_parts_become_text_joined_by_newlines_as_vllm_joins_them():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Plan a trip"},
                "to Lisbon",
                {"type": "text", "text": None},
            ],
        },
    ]
    assert training_messages(messages) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Plan a trip\nto Lisbon"},
    ]


def test_duplicates_by_id_and_by_prompt_within_the_window():
    f = PromptFilter(fits_anything, remembered_keys=3, max_user_share=None)
    f.check(prompt("a", "one"))
    with pytest.raises(Unusable, match="duplicate"):
        f.check(prompt("a", "other text, same record id"))
    with pytest.raises(Unusable, match="duplicate"):
        f.check(prompt("b", "one"))  # same prompt, new record
    for i in range(4):  # push "one" out of the window
        f.check(prompt(f"x{i}", f"filler {i}"))
    f.check(prompt("c", "one"))


@pytest.mark.parametrize(
    "share, batch, cap", [(0.25, 4, 1), (0.25, 16, 4), (0.5, 3, 1), (None, 4, 4), (1.0, 4, 4)]
)
def test_per_principal_cap(share, batch, cap):
    f = PromptFilter(fits_anything, 10, max_user_share=share)
    assert f.principal_cap(batch) == cap


# -- does a prompt fit the learner's renderings? (the tiny model's ChatML template) --------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


def test_a_prompt_fits_when_every_rendering_fits(tokenizer):
    from learner.grpo import prompt_ids, rollout_messages
    from learner.rollout import JUDGE_TOKENS, check_fits, judge_request

    cfg = LearnerConfig(max_new_tokens=16, reward_mode="expected")
    messages = [{"role": "user", "content": "Plan a trip"}]
    rollout = len(prompt_ids(tokenizer, rollout_messages(messages)))
    judged = len(prompt_ids(tokenizer, judge_request(messages, "")))
    # The judge prompt, then the answer inside it, then the judge's own token, is the longest.
    needed = max(rollout, judged + JUDGE_TOKENS["expected"]) + cfg.max_new_tokens
    check_fits(tokenizer, messages, cfg, max_model_len=needed)
    with pytest.raises(Unusable, match="too_long_for_model"):
        check_fits(tokenizer, messages, cfg, max_model_len=needed - 1)


def test_max_prompt_tokens_bounds_the_prompt_as_trained_on(tokenizer):
    from learner.rollout import check_fits

    cfg = LearnerConfig(max_prompt_tokens=64)
    check_fits(tokenizer, [{"role": "user", "content": words(5)}], cfg, max_model_len=10**6)
    with pytest.raises(Unusable, match="too_long"):
        check_fits(tokenizer, [{"role": "user", "content": words(100)}], cfg, max_model_len=10**6)


def test_what_the_chat_template_cannot_render_is_unrenderable(tokenizer):
    from learner.rollout import check_fits

    roleless = [{"content": "who am I?"}, {"role": "user", "content": "hi"}]
    with pytest.raises(Unusable, match="unrenderable"):
        check_fits(tokenizer, roleless, LearnerConfig(), max_model_len=10**6)


def test_content_parts_render_as_the_text_they_hold(tokenizer):
    """The template concatenates strings: parts made it raise (the learner's crash loop)."""
    from learner.grpo import prompt_ids, rollout_messages
    from learner.rollout import judge_request

    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    text = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert prompt_ids(tokenizer, parts) == prompt_ids(tokenizer, text)
    assert prompt_ids(tokenizer, rollout_messages(parts)) == prompt_ids(
        tokenizer, rollout_messages(text)
    )
    assert judge_request(parts, "answer") == judge_request(text, "answer")


def test_a_judge_request_that_outgrew_its_budget_is_left_unscored(tokenizer):
    """An answer's text can re-tokenise longer than sampled; vLLM would refuse the whole batch."""
    from learner.grpo import prompt_ids
    from learner.rollout import judge_request, judgeable

    messages = [{"role": "user", "content": "Plan a trip"}]
    short, long = judge_request(messages, "Lisbon."), judge_request(messages, words(50))
    room = len(prompt_ids(tokenizer, short)) + 1  # the judge's one token (expected mode)
    assert judgeable(tokenizer, [short, long, short], "expected", room) == [0, 2]


def test_a_resume_offset_the_topic_no_longer_holds_follows_the_stated_rule(caplog):
    ahead = metrics.OFFSET_RESETS.labels("ahead_of_end")._value.get()
    behind = metrics.OFFSET_RESETS.labels("behind_start")._value.get()
    expired = metrics.RECORDS_SKIPPED.labels("expired_unread")._value.get()
    assert start_offset("t:0", 5, first=2, end=9) == 5  # held: used as it is
    assert start_offset("t:0", 9, first=2, end=9) == 9  # at the end: the next record
    # Past the end: the topic was recreated, everything in it is new.
    assert start_offset("t:0", 12, first=0, end=4) == 0
    # Before the first record: retention deleted 3 unread records; they are counted.
    assert start_offset("t:1", 4, first=7, end=10) == 7
    assert metrics.OFFSET_RESETS.labels("ahead_of_end")._value.get() == ahead + 1
    assert metrics.OFFSET_RESETS.labels("behind_start")._value.get() == behind + 1
    assert metrics.RECORDS_SKIPPED.labels("expired_unread")._value.get() == expired + 3
    assert "topic was recreated" in caplog.text and "retention deleted 3" in caplog.text
