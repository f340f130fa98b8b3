"""Turning interaction records into training prompts: pure logic, no broker."""

import pytest

from learner.consumer import PromptFilter, TrainingPrompt, Unusable, training_messages


def prompt(record_id: str, text: str, user: str = "u1") -> TrainingPrompt:
    return TrainingPrompt(record_id, user, [{"role": "user", "content": text}])


def test_training_prompt_is_the_conversation_up_to_the_last_user_turn():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Plan a trip"},
        {"role": "assistant", "content": "Where to?"},
        {"role": "user", "content": "Lisbon"},
        {"role": "assistant", "content": "Day 1 ..."},
    ]
    assert training_messages(messages) == messages[:4]  # the user's own system prompt kept


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "assistant", "content": "hi"}], "no_user_turn"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "non_text_content"),
    ([{"role": "user", "content": None}], "non_text_content"),
])
def test_unusable_conversations_are_named(messages, reason):
    with pytest.raises(Unusable) as info:
        training_messages(messages)
    assert info.value.reason == reason


def test_text_parts_are_fine():
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert training_messages(parts) == parts


def test_duplicates_by_id_and_by_prompt_within_the_window():
    f = PromptFilter(lambda m: 10, max_prompt_tokens=100, window=3, max_user_share=None)
    f.check(prompt("a", "one"))
    with pytest.raises(Unusable, match="duplicate"):
        f.check(prompt("a", "other text, same record id"))
    with pytest.raises(Unusable, match="duplicate"):
        f.check(prompt("b", "one"))  # same prompt, new record
    for i in range(4):  # push "one" out of the window
        f.check(prompt(f"x{i}", f"filler {i}"))
    f.check(prompt("c", "one"))


def test_too_long_prompts_are_skipped():
    f = PromptFilter(lambda m: len(m[0]["content"]), max_prompt_tokens=5, window=10,
                     max_user_share=None)
    f.check(prompt("a", "short"))
    with pytest.raises(Unusable, match="too_long"):
        f.check(prompt("b", "much too long"))


@pytest.mark.parametrize("share, batch, cap", [(0.25, 4, 1), (0.25, 16, 4), (0.5, 3, 1),
                                               (None, 4, 4), (1.0, 4, 4)])
def test_per_user_cap(share, batch, cap):
    f = PromptFilter(lambda m: 1, 10, 10, max_user_share=share)
    assert f.user_cap(batch) == cap
