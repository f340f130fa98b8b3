"""IFEval with the reference checkers, offline: hand-written responses that pass and fail."""

from __future__ import annotations

import json
from pathlib import Path

import nltk
import pytest
from scripted_openai import ScriptedOpenAI
from typer.testing import CliRunner

from offline.evaluate import eval_app
from shared.ifeval import IFEvalExample, evaluate_responses, load_examples, prepare_offline_nltk

TITLE_BODY = "<<A Plan For The Week>>\nWe cook on Monday and walk on Tuesday."

# (instruction id, kwargs, response that follows it, response that does not)
CASES = [
    (
        "keywords:existence",
        {"keywords": ["garden", "river"]},
        "The garden runs down to the river.",
        "The garden is small.",
    ),
    (
        "keywords:frequency",
        {"keyword": "plan", "frequency": 3, "relation": "at least"},
        "A plan, a second plan and a third plan.",
        "One plan is enough.",
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["money"]},
        "Time matters most here.",
        "Money matters most here.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 8, "relation": "less than"},
        "Short and sweet.",
        "This answer is clearly much longer than eight words in total.",
    ),
    # Punkt must know "Dr." is an abbreviation: the failing text is one sentence, not two.
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "Dr. Smith came home. He slept well.",
        "Dr. Smith came home late.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "Only one part.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* buy seeds\n* plant them",
        "* buy seeds\n* plant them\n* water them",
    ),
    ("detectable_format:title", {}, TITLE_BODY, "A Plan For The Week\nWe cook on Monday."),
    ("punctuation:no_comma", {}, "No commas appear in this answer.", "Yes, commas appear."),
    (
        "change_case:english_lowercase",
        {},
        "this whole answer is written in plain lowercase english letters for the test.",
        "This Whole Answer Is Written In Title Case English Letters For The Test.",
    ),
    (
        "change_case:english_capital",
        {},
        "THIS WHOLE ANSWER IS WRITTEN IN CAPITAL ENGLISH LETTERS FOR THE TEST.",
        "this whole answer is written in plain lowercase english letters for the test.",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Is there anything else I can help with?"},
        "Here is the plan. Is there anything else I can help with?",
        "Here is the plan.",
    ),
    (
        "language:response_language",
        {"language": "de"},
        "Das ist eine ziemlich lange Antwort auf Deutsch, die den Plan für die Woche beschreibt.",
        "This is a fairly long answer in English that describes the plan for the week.",
    ),
]


def _example(key: int, instruction_ids: list[str], kwargs: list[dict]) -> IFEvalExample:
    return IFEvalExample(
        key=key, prompt=f"prompt {key}", instruction_id_list=instruction_ids, kwargs=kwargs
    )


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "passing", "failing"), CASES, ids=[c[0] for c in CASES]
)
def test_reference_verdicts(instruction_id: str, kwargs: dict, passing: str, failing: str) -> None:
    examples = [_example(1, [instruction_id], [kwargs]), _example(2, [instruction_id], [kwargs])]
    result, items = evaluate_responses(examples, {"prompt 1": passing, "prompt 2": failing})
    assert items[0].follow_strict == [True] and items[0].follow_loose == [True]
    assert items[1].follow_strict == [False]
    assert result.prompt_level_strict == 0.5


def test_loose_forgives_a_preamble_line() -> None:
    example = _example(1, ["punctuation:no_comma"], [{}])
    result, items = evaluate_responses(
        [example], {"prompt 1": "Sure, here it is:\nno commas in the answer itself"}
    )
    assert items[0].follow_strict == [False] and items[0].follow_loose == [True]
    assert (result.prompt_level_strict, result.prompt_level_loose) == (0.0, 1.0)


def test_prompt_and_instruction_level_accuracy() -> None:
    examples = [
        _example(1, ["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["tea"]}]),
        _example(2, ["punctuation:no_comma"], [{}]),
    ]
    result, _ = evaluate_responses(
        examples, {"prompt 1": "Coffee and cake.", "prompt 2": "No commas."}
    )
    assert (result.n_prompts, result.n_instructions) == (2, 3)
    assert result.prompt_level_strict == 0.5 and result.instruction_level_strict == pytest.approx(
        2 / 3
    )
    assert result.by_instruction_strict == {"keywords:existence": 0.0, "punctuation:no_comma": 1.0}


def test_dataset_and_subsets() -> None:
    everything = load_examples()
    assert len(everything) == 541 and len({e.key for e in everything}) == 541
    assert [e.key for e in load_examples(limit=3)] == [e.key for e in everything[:3]]
    no_comma = load_examples(instruction_types=["punctuation:no_comma"])
    assert len(no_comma) == 66 and all(
        "punctuation:no_comma" in e.instruction_id_list for e in no_comma
    )
    case = load_examples(limit=5, instruction_types=["change_case"])
    assert len(case) == 5 and all(
        any(i.startswith("change_case") for i in e.instruction_id_list) for e in case
    )


def test_prepare_offline_nltk(tmp_path: Path) -> None:
    data_dir = prepare_offline_nltk(tmp_path)
    model_dir = tmp_path / "tokenizers" / "punkt_tab" / "english"
    names = {"abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab"}
    assert {p.name for p in model_dir.iterdir()} == names
    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(data_dir))
    tokenizer = nltk.tokenize.PunktTokenizer("english")
    assert tokenizer.tokenize("Mr. Brown met Dr. Smith at 5 p.m. today. They talked.") == [
        "Mr. Brown met Dr. Smith at 5 p.m. today.",
        "They talked.",
    ]


def test_cli_scores_a_response_file(tmp_path: Path) -> None:
    examples = load_examples(limit=4, instruction_types=["punctuation:no_comma"])
    responses = tmp_path / "responses.jsonl"
    answers = ["An answer without commas."] * 3 + ["An answer, with a comma."]
    responses.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "response": r}) + "\n"
            for e, r in zip(examples, answers, strict=True)
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        eval_app,
        [
            "ifeval",
            "--responses",
            str(responses),
            "--limit",
            "4",
            "--instruction-type",
            "punctuation:no_comma",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["n_prompts"] == 4
    no_comma = summary["result"]["by_instruction_strict"]["punctuation:no_comma"]
    assert no_comma == 0.75
    assert len((out / "items.jsonl").read_text().splitlines()) == 4


def test_cli_asks_a_target(tmp_path: Path) -> None:
    def always_plain(request: dict) -> str:
        return "A plain answer without any commas at all."

    with ScriptedOpenAI(always_plain) as server:
        result = CliRunner().invoke(
            eval_app,
            [
                "ifeval",
                "--model",
                f"{server.base_url}#scripted",
                "--limit",
                "3",
                "--instruction-type",
                "punctuation:no_comma",
                "--out",
                str(tmp_path),
                "--json",
            ],
        )
    assert result.exit_code == 0, result.output
    assert len(server.requests) == 3
    assert all(
        r["temperature"] == 0.0 and r["max_completion_tokens"] == 1280 for r in server.requests
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"]["by_instruction_strict"]["punctuation:no_comma"] == 1.0
