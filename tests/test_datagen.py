"""datagen end to end against a scripted OpenAI-compatible server (no model, no network)."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from scripted_openai import ScriptedOpenAI, last_user_message

from offline.datagen import (
    DatagenSettings,
    GoalRecord,
    PromptRecord,
    clean_goal,
    clean_task_prompt,
    parse_critique,
    read_records,
    run_datagen,
)
from shared.judge import Endpoint
from shared.prompts import GOAL_PROMPT
from shared.rouge import lcs_length, rouge_l_f

STUBBORN = "Organize a community garden"  # never appropriate: the round limit
UNPARSABLE_FIRST = "Choose a career path after graduation"  # first critique has no verdict
ORIGINAL = "Plan a family vacation itinerary"
NEAR_COPY = "Plan a family vacation itinerary for summer"  # its prompt nearly repeats ORIGINAL's
GOALS = [ORIGINAL, UNPARSABLE_FIRST, STUBBORN, NEAR_COPY] + [
    f"Decide on plan number {i}" for i in range(4, 40)
]


def _distinct_prompt(goal: str) -> str:
    """A 40-word prompt of made-up words, unlike any other goal's (ROUGE-L far below 0.7)."""
    rng = random.Random(goal)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(40))


def _goal_of(text: str) -> str:
    found = re.search(r"The task's goal is to (.+)", text)
    assert found, "every generator and critic request carries the criteria"
    return found.group(1).strip()


def _same(goal_in_criteria: str, goal: str) -> bool:
    return goal_in_criteria.lower() == goal.lower()


def datagen_script(request: dict) -> str:
    text = last_user_message(request)
    if text == GOAL_PROMPT:
        # The goal model sees its earlier goals as chat history: goal k follows k answers.
        earlier = sum(m["role"] == "assistant" for m in request["messages"])
        return f"{GOALS[earlier]}\n"
    if text.startswith("our task is to generate"):
        goal = _goal_of(text)
        base = (
            _distinct_prompt(ORIGINAL)
            if _same(goal, NEAR_COPY) or _same(goal, ORIGINAL)
            else _distinct_prompt(goal)
        )
        if _same(goal, NEAR_COPY):
            base = base.replace(base.split()[5], "changed")  # one word differs
        return f"#Task Prompt#: {base}"
    if text.startswith("Given your previous #Task Prompt#"):
        previous = text.split("#Task Prompt#:\n\n")[-1].split("\n\n#Critique#:")[0]
        return f'"{previous} (revised)"'
    if text.startswith("Given a candidate of a #Task Prompt#"):
        goal = _goal_of(text)
        prompt = text.split("#Task Prompt#:\n\n")[-1].split("\n\n#Critique#:")[0]
        if _same(goal, STUBBORN):
            return "It hints at factors. In conclusion, this task prompt is: Inappropriate."
        if "(revised)" in prompt:
            return (
                "Open-ended and concrete.\n\nIn conclusion, this task prompt is: **Appropriate**."
            )
        if _same(goal, UNPARSABLE_FIRST):
            return "Hmm, hard to say."
        return "It lists choices. In conclusion, this task prompt is: Inappropriate."
    raise AssertionError(f"unexpected request: {text[:80]!r}")


def _settings(server: ScriptedOpenAI, **overrides) -> DatagenSettings:
    role = {"endpoint": Endpoint(base_url=server.base_url, model="scripted", api_key="test")}
    values = dict(
        goal=role,
        generator=role,
        critic=role,
        num_goals=8,
        max_refinements=2,
        concurrency=3,
        goal_history=1000,
    )
    values.update(overrides)
    return DatagenSettings.model_validate(values)


def _records(out: Path) -> tuple[list[PromptRecord], list[PromptRecord]]:
    kept = read_records(out / "prompts.jsonl", PromptRecord)
    return kept, read_records(out / "rejected.jsonl", PromptRecord)


def _all_records(out: Path) -> list[PromptRecord]:
    kept, rejected = _records(out)
    return kept + rejected


def test_refinement_round_limit_dedupe_and_report(tmp_path: Path) -> None:
    with ScriptedOpenAI(datagen_script) as server:
        server.fail_next(2, status=503)  # transient errors are retried
        server.fail_next(1, status=429)
        report = asyncio.run(run_datagen(_settings(server), tmp_path, show_progress=False))
    kept, rejected = _records(tmp_path)
    by_goal = {r.goal: r for r in kept + rejected}

    assert report.goals == 8 and report.kept + report.rejected_round_limit + report.duplicates == 8
    assert report.rejected_round_limit == 1 and report.duplicates == 1 and report.kept == 6
    assert report.errors_this_run == 0 and len(server.failed) == 3

    refined = by_goal["Decide on plan number 4"]
    assert refined.status == "kept" and refined.appropriate and refined.rounds == 2
    assert [c.verdict for c in refined.critiques] == ["inappropriate", "appropriate"]
    assert refined.prompt.endswith("(revised)") and not refined.prompt.startswith(("#", '"'))

    stubborn = by_goal[STUBBORN]
    assert stubborn.status == "rejected_round_limit" and not stubborn.appropriate
    assert stubborn.rounds == 3 and all(c.verdict == "inappropriate" for c in stubborn.critiques)

    unparsable = by_goal[UNPARSABLE_FIRST]
    assert unparsable.critiques[0].verdict == "unparsable" and unparsable.critiques[0].note
    assert unparsable.status == "kept" and report.unparsable_critiques == 1

    # Whichever of the two near-copies finished second is the duplicate of the other.
    pair = sorted([by_goal[ORIGINAL], by_goal[NEAR_COPY]], key=lambda r: r.status)
    duplicate, original = pair[0], pair[1]
    assert duplicate.status == "duplicate" and original.status == "kept"
    assert duplicate.duplicate_of == original.goal_index and duplicate.max_rouge_l > 0.7
    assert all(r.max_rouge_l is None or r.max_rouge_l <= 0.7 for r in kept)

    # Goal k was asked for with the k earlier goals as chat history.
    goal_requests = [r for r in server.requests if last_user_message(r) == GOAL_PROMPT]
    assert [sum(m["role"] == "assistant" for m in r["messages"]) for r in goal_requests] == list(
        range(8)
    )

    assert (tmp_path / "report.json").exists()
    for name in report.figures:
        image = Image.open(tmp_path / name)
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 10  # bars, axes, text: not a blank canvas
        assert (tmp_path / name).stat().st_size > 5_000


def test_resume_after_interruption_does_no_goal_twice(tmp_path: Path) -> None:
    num_goals = 12

    async def interrupted_run(server: ScriptedOpenAI) -> None:
        run = asyncio.create_task(
            run_datagen(_settings(server, num_goals=num_goals), tmp_path, show_progress=False)
        )
        while len(_all_records(tmp_path)) < 4:
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(0.3)  # the server finishes requests the cancelled run left behind

    with ScriptedOpenAI(datagen_script, delay_s=0.01) as server:
        asyncio.run(interrupted_run(server))
        done_first = {r.goal_index for r in _all_records(tmp_path)}
        goals_first = len(read_records(tmp_path / "goals.jsonl", GoalRecord))
        assert 4 <= len(done_first) < num_goals
        first_run_requests = len(server.requests)

        report = asyncio.run(
            run_datagen(_settings(server, num_goals=num_goals), tmp_path, show_progress=False)
        )
        second_run = server.requests[first_run_requests:]

    records = _all_records(tmp_path)
    indices = [r.goal_index for r in records]
    assert sorted(indices) == list(range(num_goals))  # every goal once, none twice
    assert report.goals == num_goals
    goals = read_records(tmp_path / "goals.jsonl", GoalRecord)
    assert [g.index for g in goals] == list(range(num_goals))

    # Nothing finished before the interruption was asked for again.
    asked_again = Counter(
        _goal_of(last_user_message(r))
        for r in second_run
        if last_user_message(r).startswith("our task is to generate")
    )
    finished_goals = {g.goal.lower() for g in goals if g.index in done_first}
    assert not finished_goals & {goal.lower() for goal in asked_again}
    # The goal chain continued from its saved history.
    resumed_goal_requests = [r for r in second_run if last_user_message(r) == GOAL_PROMPT]
    assert len(resumed_goal_requests) == num_goals - goals_first
    if resumed_goal_requests:
        assert (
            sum(m["role"] == "assistant" for m in resumed_goal_requests[0]["messages"])
            == goals_first
        )


def test_lcs_matches_dynamic_programming() -> None:
    def reference(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = (
                    table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
                )
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 30))]
        assert lcs_length(a, b) == reference(a, b)
    assert rouge_l_f("the cat sat".split(), "the cat sat".split()) == 1.0
    assert rouge_l_f([], ["x"]) == 0.0
    # LCS 3 of 4 and 3 of 6: P = 0.75, R = 0.5, F = 0.6
    assert rouge_l_f("a b c d".split(), "a x b y c z".split()) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("critique", "verdict"),
    [
        ("Good. In conclusion, this task prompt is: Appropriate.", "appropriate"),
        ("Leading. In conclusion, this task prompt is: Inappropriate.", "inappropriate"),
        ('In conclusion, this task prompt is: "**Appropriate**"', "appropriate"),
        ("in conclusion this task prompt is inappropriate", "inappropriate"),
        (
            "Mentions CA.\nIn conclusion, this task prompt is: Appropriate.\n"
            "Wait, in conclusion, this task prompt is: Inappropriate.",
            "inappropriate",
        ),
        ("It is fine overall.\nVerdict: Appropriate", "appropriate"),
        ("Too narrow.\nNot appropriate.", "inappropriate"),
        ("Appropriate or inappropriate, hard to tell.", "unparsable"),
        ("", "unparsable"),
    ],
)
def test_parse_critique(critique: str, verdict: str) -> None:
    assert parse_critique(critique)[0] == verdict


def test_cleaning() -> None:
    assert clean_task_prompt("#Revised Task Prompt#: Plan it.") == "Plan it."
    assert clean_task_prompt('"Plan it."') == "Plan it."
    assert clean_goal("1. Task: Buy a house\nmore") == "Buy a house"
    assert clean_goal("**Plan a wedding**") == "Plan a wedding"


def test_diversity_of_an_existing_prompt_set(tmp_path: Path) -> None:
    """`dynalign datagen --diversity-of` draws the Figure 3 histograms of any prompt files
    without generating anything (how shared/data/ca_prompts' figures are made)."""
    import json

    from typer.testing import CliRunner

    from dynalign.cli import app

    files = []
    for name, texts in {
        "a": ["Plan a garden with neighbours", "Run a food bank"],
        "b": ["Plan a garden with my neighbours", "Teach a child to swim"],
    }.items():
        files += ["--diversity-of", str(tmp_path / f"{name}.jsonl")]
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": t}) + "\n" for t in texts)
        )
    result = CliRunner().invoke(app, ["datagen", *files, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["prompts"] == 4 and summary["rouge_l_pairwise"]["max"] > 0.8  # the near-copy
    for figure in summary["figures"]:
        assert Image.open(figure).format == "PNG"
