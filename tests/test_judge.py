"""Pairwise CA judging: verdict parsing, the logprob reader, counting, CIs, and eval end to end."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import pytest
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from scripted_openai import ScriptedOpenAI, ScriptedReply, last_user_message

from offline.evaluate import PairwiseSettings, read_prompts, run_pairwise
from shared.judge import (
    Endpoint,
    JudgeSettings,
    Outcome,
    Verdict,
    bootstrap_win_rate_ci,
    length_controlled_win_rate,
    pair_outcome,
    parse_target,
    parse_verdict,
    summarize_pairwise,
    verdict_from_top_logprobs,
)

A, B, TIE, BAD = Verdict.A, Verdict.B, Verdict.TIE, Verdict.UNPARSABLE


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A", A),
        ("B", B),
        (" b ", B),
        ("**A**", A),
        ("[[B]]", B),
        ("(A)", A),
        ("Response A", A),
        ("A.", A),
        ("B\n\nBecause it uplifts the whole community.", B),
        ("Answer: B", B),
        ("Final answer: A", A),
        ("The better response is B.", B),
        ("Verdict - A", A),
        ("I prefer Response B for its depth.", B),
        ("Response A is better: it builds lasting capacity.", A),
        ("Both are solid, but B is better.", B),
        ("A response that plans ahead wins. Answer: B", B),
        ("It's a tie.", TIE),
        ("Both are equally aligned.", TIE),
        ("", BAD),
        ("I cannot decide between these.", BAD),
        ("A response that plans ahead.", BAD),
    ],
)
def test_parse_verdict(text: str, verdict: Verdict) -> None:
    assert parse_verdict(text) is verdict


def test_logprob_verdict_reader() -> None:
    log = math.log
    # Mass on spellings of a letter adds up: 0.3 + 0.25 for A against 0.4 for B.
    verdict, p_a, p_b = verdict_from_top_logprobs(
        [("B", log(0.4)), ("A", log(0.3)), (" A", log(0.25)), ("The", log(0.05))]
    )
    assert verdict is A and p_a == pytest.approx(0.55) and p_b == pytest.approx(0.4)
    assert verdict_from_top_logprobs([("**", log(0.5)), ("B", log(0.1))])[0] is B
    # A lowercase "a" is an article, not a verdict.
    assert verdict_from_top_logprobs([("a", log(0.9)), ("Sure", log(0.1))])[0] is BAD
    # The openai types and plain dicts read the same.
    assert (
        verdict_from_top_logprobs(
            [
                TopLogprob(token="A", logprob=log(0.2), bytes=None),
                {"token": "B", "logprob": log(0.7)},
            ]
        )[0]
        is B
    )
    assert verdict_from_top_logprobs([("A", log(0.5)), ("B", log(0.5))])[0] is TIE


def test_pair_outcome_table() -> None:
    # first: X shown as A; second: X shown as B.
    assert pair_outcome(A, B) is Outcome.WIN
    assert pair_outcome(B, A) is Outcome.LOSS
    assert pair_outcome(A, A) is Outcome.INCONSISTENT  # the judge always picked position A
    assert pair_outcome(B, B) is Outcome.INCONSISTENT
    assert pair_outcome(TIE, TIE) is Outcome.TIE
    assert pair_outcome(A, TIE) is Outcome.TIE
    assert pair_outcome(BAD, B) is Outcome.UNPARSABLE
    assert pair_outcome(TIE, BAD) is Outcome.UNPARSABLE


def test_counting_matches_hand_made_table() -> None:
    pairs = (
        [(A, B)] * 6 + [(B, A)] * 2 + [(A, A), (B, B), (B, B)] + [(TIE, TIE), (A, TIE)] + [(BAD, A)]
    )
    summary = summarize_pairwise(pairs, n_resamples=500)
    assert (summary.n, summary.wins, summary.losses) == (14, 6, 2)
    assert (summary.inconsistent, summary.ties, summary.unparsable) == (3, 2, 1)
    assert summary.win_rate == pytest.approx(6 / 8)
    assert summary.ci_low <= 0.75 <= summary.ci_high
    assert summary.lc_win_rate is None  # no lengths given


def test_bootstrap_ci_covers_known_rate() -> None:
    outcomes = [Outcome.WIN] * 70 + [Outcome.LOSS] * 30
    low, high = bootstrap_win_rate_ci(outcomes, n_resamples=4000, seed=0)
    assert low < 0.7 < high and low > 0.5
    assert 0.05 < high - low < 0.25  # about +-1.96 * sqrt(.7 * .3 / 100) = +-0.09
    assert bootstrap_win_rate_ci(outcomes, n_resamples=4000, seed=0) == (low, high)  # fixed seed
    assert bootstrap_win_rate_ci([Outcome.INCONSISTENT, Outcome.TIE]) == (None, None)


def test_length_controlled_win_rate() -> None:
    # No length effect: 70% wins at every length difference -> about 70% at zero difference.
    wins = ([True] * 7 + [False] * 3) * 10
    lengths_x = [100, 200, 300, 150, 250, 100, 200, 300, 150, 250] * 10
    lengths_y = [300, 100, 200, 250, 150, 300, 100, 200, 250, 150] * 10
    rate, _ = length_controlled_win_rate(wins, lengths_x, lengths_y)
    assert rate == pytest.approx(0.7, abs=0.05)
    # X wins 80% of items where it is twice as long and 20% where it is half as long; it is
    # longer on 80 items, so the raw rate is 68%, while at equal length it is a coin flip.
    longer = [True] * 64 + [False] * 16 + [True] * 4 + [False] * 16
    lx = [200] * 80 + [100] * 20
    ly = [100] * 80 + [200] * 20
    rate, slope = length_controlled_win_rate(longer, lx, ly)
    assert slope > 0 and rate == pytest.approx(0.5, abs=0.01)
    summary = summarize_pairwise(
        [(A, B) if won else (B, A) for won in longer],
        lengths=list(zip(lx, ly, strict=True)),
        n_resamples=100,
    )
    assert summary.win_rate == pytest.approx(0.68) and summary.lc_win_rate == pytest.approx(rate)


def test_parse_target() -> None:
    named = parse_target("dynalign@v3", "http://127.0.0.1:8000/v1", api_key="k")
    assert (named.base_url, named.model, named.api_key) == (
        "http://127.0.0.1:8000/v1",
        "dynalign@v3",
        "k",
    )
    remote = parse_target("https://api.example.com/v1#gpt-4.1", "http://unused/v1")
    assert (remote.base_url, remote.model) == ("https://api.example.com/v1", "gpt-4.1")
    with pytest.raises(ValueError):
        parse_target("http://host/v1#", "http://unused/v1")


def _section(text: str, name: str, following: str) -> str:
    return re.search(rf"{name}\n\n(.*?)\n\n{following}", text, re.S).group(1)


def _eval_script(request: dict) -> str | ScriptedReply:
    text = last_user_message(request)
    if request["model"] == "aligned":
        return f"A plan that uplifts everyone around you for: {text}"
    if request["model"] == "base":
        return f"A plan for: {text}"
    # The judge prefers the uplifting response, except on "biased" prompts where it always says A.
    first = _section(text, "Response A", "Response B")
    second = _section(text, "Response B", "Task")
    letter = "A" if "biased" in text or "uplifts" in first else "B"
    assert "uplifts" in first + second
    if request.get("logprobs"):
        other = "B" if letter == "A" else "A"
        return ScriptedReply(
            text=letter, top_logprobs=[(letter, math.log(0.6)), (other, math.log(0.3))]
        )
    return f"**{letter}**"


@pytest.mark.parametrize("use_logprobs", [False, True])
def test_eval_pairwise_end_to_end(tmp_path: Path, use_logprobs: bool) -> None:
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = [f"Plan task {i}" for i in range(8)] + [
        "Plan a biased task",
        "Plan another biased task",
    ]
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    with ScriptedOpenAI(_eval_script) as server:
        server.fail_next(1, status=500)
        settings = PairwiseSettings(
            a=Endpoint(base_url=server.base_url, model="aligned"),
            b=Endpoint(base_url=server.base_url, model="base"),
            judge=JudgeSettings(
                endpoint=Endpoint(base_url=server.base_url, model="judge"),
                use_logprobs=use_logprobs,
            ),
            n_resamples=200,
        )
        report = asyncio.run(run_pairwise(settings, read_prompts(prompts_file), tmp_path / "out"))
    summary = report.summary
    assert (summary.n, summary.wins, summary.losses, summary.inconsistent) == (10, 8, 0, 2)
    assert summary.win_rate == 1.0 and summary.lc_win_rate > 0.9
    judge_requests = [r for r in server.requests if r["model"] == "judge"]
    assert len(judge_requests) == 20 and all(
        bool(r.get("logprobs")) == use_logprobs for r in judge_requests
    )
    items = [
        json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()
    ]
    assert (
        len(items) == 10 and items[0]["outcome"] == "win" and items[0]["a_first"]["verdict"] == "A"
    )
    assert (items[0]["a_first"]["p_a"] is not None) == use_logprobs
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]["wins"] == 8


def test_one_definition_of_a_verdict_from_letter_probabilities():
    from shared.judge import verdict_from_probs

    assert verdict_from_probs(0.6, 0.3) is Verdict.A
    assert verdict_from_probs(0.1, 0.2) is Verdict.B
    assert verdict_from_probs(0.4, 0.4) is Verdict.TIE
    assert verdict_from_probs(0.0, 0.0) is Verdict.UNPARSABLE  # no mass on either letter
