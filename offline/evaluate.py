"""`dynalign eval score | pairwise | ifeval`: the paper's evaluation (Section 3.1), with CIs.

score: responses from two targets on held-out prompts, each scored 0-5 by a frozen judge with
the paper's reward prompt (the probability-weighted mean over the digits when the judge returns
log-probs), paired per prompt: the mean difference with a bootstrap CI. The judge is the same
for every version (e.g. `dynalign@base`), never the version being measured.

pairwise: responses from two targets on held-out prompts, each pair judged in both orders by a
CA judge (shared/judge.py), a win only when both orders agree; the per-item record goes to
items.jsonl for audit and the counts to summary.json.
ifeval: a target's responses to the IFEval prompts (or a response file), scored by the reference
checkers offline (shared/ifeval.py); prompt- and instruction-level, strict and loose.

A target is `name` (a model on the default base URL, e.g. `dynalign@base`, `dynalign@v3`) or
`URL#model` for any OpenAI-compatible endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import openai
import typer
from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from shared import ifeval as ifeval_lib
from shared.files import read_jsonl
from shared.judge import (
    Endpoint,
    JudgeCall,
    JudgeSettings,
    Outcome,
    PairwiseSummary,
    Response,
    Sampling,
    bootstrap_mean_ci,
    chat,
    collect_responses,
    completion_text,
    default_base_url,
    judge_items,
    parse_target,
    summarize_pairwise,
)
from shared.reward import expected_score, parse_score, reward_prompt

T = TypeVar("T")
eval_app = typer.Typer(
    help="Evaluate targets: pairwise CA judgement, IFEval.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)


class PairwiseSettings(BaseModel):
    a: Endpoint  # X: the target whose win rate is reported
    b: Endpoint
    judge: JudgeSettings
    # Greedy by default so a rerun compares the same responses.
    response_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=1024)
    )
    system_prompt: str | None = None
    concurrency: int = 8
    n_resamples: int = 2000
    seed: int = 0


class PairwiseItem(BaseModel):
    index: int
    prompt: str
    response_a: str
    response_b: str
    a_first: JudgeCall  # judge call with A's response shown first
    a_second: JudgeCall  # judge call with A's response shown second
    outcome: Outcome  # for A
    words_a: int
    words_b: int


class PairwiseReport(BaseModel):
    a: str
    b: str
    judge: str
    prompts: int
    summary: PairwiseSummary


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """JSONL with a `prompt` field (datagen's prompts.jsonl) or plain text, one prompt a line."""
    if path.suffix == ".jsonl":
        prompts = [row["prompt"] for _, row in read_jsonl(path)]
    else:
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit is not None else prompts


async def _both_responses(
    settings: PairwiseSettings | ScoreSettings, prompts: list[str], system_prompt: str | None = None
) -> list[list[Response]]:
    return list(
        await asyncio.gather(
            *(
                collect_responses(
                    endpoint,
                    prompts,
                    settings.response_sampling,
                    settings.concurrency,
                    system_prompt,
                )
                for endpoint in (settings.a, settings.b)
            )
        )
    )


async def run_pairwise(
    settings: PairwiseSettings,
    prompts: list[str],
    out_dir: Path,
    responses: list[list[Response]] | None = None,
) -> PairwiseReport:
    """`responses`: A's and B's answers when the caller has them already (greedy answers are
    the same for every evaluation of a target)."""
    responses_a, responses_b = responses or await _both_responses(
        settings, prompts, settings.system_prompt
    )
    responses_a, responses_b = [r.text for r in responses_a], [r.text for r in responses_b]
    judged = await judge_items(
        settings.judge,
        list(zip(prompts, responses_a, responses_b, strict=True)),
        settings.concurrency,
    )
    items = [
        PairwiseItem(
            index=i,
            prompt=prompt,
            response_a=response_a,
            response_b=response_b,
            a_first=judgement.first,
            a_second=judgement.second,
            outcome=judgement.outcome,
            words_a=len(response_a.split()),
            words_b=len(response_b.split()),
        )
        for i, (prompt, response_a, response_b, judgement) in enumerate(
            zip(prompts, responses_a, responses_b, judged, strict=True)
        )
    ]
    summary = summarize_pairwise(
        [(item.a_first.verdict, item.a_second.verdict) for item in items],
        lengths=[(item.words_a, item.words_b) for item in items],
        n_resamples=settings.n_resamples,
        seed=settings.seed,
    )
    report = PairwiseReport(
        a=_describe(settings.a),
        b=_describe(settings.b),
        judge=_describe(settings.judge.endpoint),
        prompts=len(prompts),
        summary=summary,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "items.jsonl").write_text("".join(item.model_dump_json() + "\n" for item in items))
    (out_dir / "summary.json").write_text(report.model_dump_json(indent=2) + "\n")
    return report


class ScoreSettings(BaseModel):
    a: Endpoint  # the difference is A - B
    b: Endpoint
    judge: Endpoint
    response_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=1024)
    )
    concurrency: int = 8
    n_resamples: int = 2000
    seed: int = 0


class ScoreItem(BaseModel):
    index: int
    prompt: str
    response_a: str
    response_b: str
    score_a: float | None  # None: the judge's reply held no score
    score_b: float | None


class ScoreReport(BaseModel):
    a: str
    b: str
    judge: str
    prompts: int
    scored: int  # prompts where both responses got a score
    mean_a: float | None
    mean_b: float | None
    diff: float | None  # mean over scored prompts of score_a - score_b
    ci_low: float | None
    ci_high: float | None
    a_higher: int
    b_higher: int
    words_ratio: float  # mean response length, A / B
    truncated_a: float  # share of A's responses cut by the token limit
    truncated_b: float
    confidence: float = 0.95


async def judge_score(client: openai.AsyncOpenAI, judge: str, prompt: str, response: str):
    """The judge's 0-5 CA score of one response: expected over the digits among the first
    token's top-20 log-probs (digits outside them count 0), else the score in its text."""
    completion = await chat(
        client,
        judge,
        [{"role": "user", "content": reward_prompt(prompt, response)}],
        temperature=0.0,
        max_completion_tokens=8,
        logprobs=True,
        top_logprobs=20,
    )
    logprobs = completion.choices[0].logprobs
    if logprobs and logprobs.content:
        score = expected_score({t.token: t.logprob for t in logprobs.content[0].top_logprobs})
        if score is not None:
            return score
    return parse_score(completion_text(completion))


async def run_score(
    settings: ScoreSettings,
    prompts: list[str],
    out_dir: Path,
    responses: list[list[Response]] | None = None,
) -> ScoreReport:
    """`responses` as in run_pairwise."""
    responses_a, responses_b = responses or await _both_responses(settings, prompts)
    truncated = [sum(r.truncated for r in rs) / len(rs) for rs in (responses_a, responses_b)]
    responses_a, responses_b = [r.text for r in responses_a], [r.text for r in responses_b]
    gate = asyncio.Semaphore(settings.concurrency)
    async with settings.judge.client() as client:

        async def one(prompt: str, response: str) -> float | None:
            async with gate:
                return await judge_score(client, settings.judge.model, prompt, response)

        scores = await asyncio.gather(
            *(one(p, r) for p, r in zip(prompts * 2, responses_a + responses_b, strict=True))
        )
    items = [
        ScoreItem(index=i, prompt=p, response_a=x, response_b=y, score_a=sx, score_b=sy)
        for i, (p, x, y, sx, sy) in enumerate(
            zip(
                prompts,
                responses_a,
                responses_b,
                scores[: len(prompts)],
                scores[len(prompts) :],
                strict=True,
            )
        )
    ]
    pairs = [
        (i.score_a, i.score_b) for i in items if i.score_a is not None and i.score_b is not None
    ]
    diff = low = high = None
    if pairs:
        diff, low, high = bootstrap_mean_ci(
            [x - y for x, y in pairs], settings.n_resamples, settings.seed
        )
    words = [sum(len(r.split()) for r in rs) for rs in (responses_a, responses_b)]
    report = ScoreReport(
        a=_describe(settings.a),
        b=_describe(settings.b),
        judge=_describe(settings.judge),
        prompts=len(prompts),
        scored=len(pairs),
        mean_a=sum(x for x, _ in pairs) / len(pairs) if pairs else None,
        mean_b=sum(y for _, y in pairs) / len(pairs) if pairs else None,
        diff=diff,
        ci_low=low,
        ci_high=high,
        a_higher=sum(x > y for x, y in pairs),
        b_higher=sum(y > x for x, y in pairs),
        words_ratio=words[0] / max(1, words[1]),
        truncated_a=truncated[0],
        truncated_b=truncated[1],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "items.jsonl").write_text("".join(item.model_dump_json() + "\n" for item in items))
    (out_dir / "summary.json").write_text(report.model_dump_json(indent=2) + "\n")
    return report


class IFEvalReport(BaseModel):
    target: str
    limit: int | None
    instruction_types: list[str] | None
    result: ifeval_lib.IFEvalResult


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except openai.APIError as error:  # retries exhausted, or a request the endpoint refuses
        errors.print(f"[red]evaluation stopped: {error}[/]")
        raise typer.Exit(1) from None


def _describe(endpoint: Endpoint) -> str:
    return f"{endpoint.base_url}#{endpoint.model}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pairwise_table(report: PairwiseReport) -> Table:
    s = report.summary
    table = Table(title=f"CA pairwise: A = {report.a}  vs  B = {report.b}  (judge {report.judge})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name in ("n", "wins", "losses", "inconsistent", "ties", "unparsable"):
        table.add_row(name, str(getattr(s, name)))
    table.add_row("A win rate (consistent pairs)", _rate(s.win_rate))
    table.add_row(
        f"{int(100 * s.confidence)}% bootstrap CI", f"{_rate(s.ci_low)} - {_rate(s.ci_high)}"
    )
    table.add_row("length-controlled win rate", _rate(s.lc_win_rate))
    return table


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def score_table(report: ScoreReport) -> Table:
    table = Table(title=f"CA score: A = {report.a}  vs  B = {report.b}  (judge {report.judge})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("prompts (scored)", f"{report.prompts} ({report.scored})")
    for name, value in (("mean score A", report.mean_a), ("mean score B", report.mean_b)):
        table.add_row(name, "-" if value is None else f"{value:.3f}")
    table.add_row("A - B", _points(report.diff))
    table.add_row(
        f"{int(100 * report.confidence)}% bootstrap CI",
        f"{_points(report.ci_low)} .. {_points(report.ci_high)}",
    )
    table.add_row("A higher / B higher", f"{report.a_higher} / {report.b_higher}")
    table.add_row("length A / B (words)", f"{report.words_ratio:.2f}")
    table.add_row(
        "cut by the token limit A / B", f"{report.truncated_a:.0%} / {report.truncated_b:.0%}"
    )
    return table


def ifeval_table(report: IFEvalReport) -> Table:
    r = report.result
    table = Table(
        title=f"IFEval: {report.target} ({r.n_prompts} prompts, {r.n_instructions} instructions)"
    )
    table.add_column("level")
    table.add_column("strict", justify="right")
    table.add_column("loose", justify="right")
    table.add_row("prompt", _rate(r.prompt_level_strict), _rate(r.prompt_level_loose))
    table.add_row(
        "instruction", _rate(r.instruction_level_strict), _rate(r.instruction_level_loose)
    )
    return table


BaseUrlOption = Annotated[
    str | None,
    typer.Option(help="Base URL for targets given as a bare name (default: the dynalign server)."),
]
ApiKeyOption = Annotated[
    str | None, typer.Option(envvar="OPENAI_API_KEY", help="API key for every endpoint.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
ConcurrencyOption = Annotated[int, typer.Option(help="Requests in flight per endpoint.")]
ResamplesOption = Annotated[int, typer.Option(help="Bootstrap resamples.")]
SeedOption = Annotated[int, typer.Option(help="Bootstrap seed.")]
AnswerTokensOption = Annotated[int, typer.Option(help="Token limit for the targets' responses.")]


@eval_app.command()
def pairwise(
    a: Annotated[
        str, typer.Option("--a", help="Target A, whose win rate is reported (e.g. dynalign@v3).")
    ],
    b: Annotated[str, typer.Option("--b", help="Target B (e.g. dynalign@base).")],
    prompts: Annotated[
        Path, typer.Option(help="Held-out prompts: JSONL with `prompt`, or text lines.")
    ],
    judge: Annotated[str, typer.Option(help="Judge target: `name` or `URL#model`.")],
    out: Annotated[Path, typer.Option(help="Directory for items.jsonl and summary.json.")] = Path(
        "runs/eval/pairwise"
    ),
    limit: Annotated[
        int | None, typer.Option(help="Only the first N prompts (paper: 100).")
    ] = None,
    judge_logprobs: Annotated[
        bool, typer.Option(help="Read the verdict from first-token probabilities of A vs B.")
    ] = False,
    judge_max_tokens: Annotated[int, typer.Option(help="Judge completion token limit.")] = 16,
    temperature: Annotated[
        float, typer.Option(help="Temperature for the targets' responses.")
    ] = 0.0,
    max_tokens: AnswerTokensOption = 1024,
    system_prompt: Annotated[
        str | None, typer.Option(help="System prompt for both targets.")
    ] = None,
    concurrency: ConcurrencyOption = 8,
    resamples: ResamplesOption = 2000,
    seed: SeedOption = 0,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Judge A against B on CA, both orders per prompt; a win needs both."""
    url = base_url or default_base_url()
    settings = PairwiseSettings(
        a=parse_target(a, url, api_key),
        b=parse_target(b, url, api_key),
        judge=JudgeSettings(
            endpoint=parse_target(judge, url, api_key),
            use_logprobs=judge_logprobs,
            sampling=Sampling(temperature=0.0, max_tokens=judge_max_tokens),
        ),
        response_sampling=Sampling(temperature=temperature, max_tokens=max_tokens),
        system_prompt=system_prompt,
        concurrency=concurrency,
        n_resamples=resamples,
        seed=seed,
    )
    report = _run(run_pairwise(settings, read_prompts(prompts, limit), out))
    if json_output:
        print(report.model_dump_json(indent=2))
    else:
        console.print(pairwise_table(report))


@eval_app.command()
def score(
    a: Annotated[str, typer.Option("--a", help="Target A (e.g. dynalign@v3).")],
    prompts: Annotated[
        Path, typer.Option(help="Held-out prompts: JSONL with `prompt`, or text lines.")
    ],
    b: Annotated[str, typer.Option("--b", help="Target B, the baseline.")] = "dynalign@base",
    judge: Annotated[
        str, typer.Option(help="The frozen judge: `name` or `URL#model`.")
    ] = "dynalign@base",
    out: Annotated[Path, typer.Option(help="Directory for items.jsonl and summary.json.")] = Path(
        "runs/eval/score"
    ),
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    max_tokens: AnswerTokensOption = 1024,
    concurrency: ConcurrencyOption = 8,
    resamples: ResamplesOption = 2000,
    seed: SeedOption = 0,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """A's and B's greedy answers scored 0-5 by a frozen judge, paired: A - B with a CI."""
    url = base_url or default_base_url()
    settings = ScoreSettings(
        a=parse_target(a, url, api_key),
        b=parse_target(b, url, api_key),
        judge=parse_target(judge, url, api_key),
        response_sampling=Sampling(temperature=0.0, max_tokens=max_tokens),
        concurrency=concurrency,
        n_resamples=resamples,
        seed=seed,
    )
    report = _run(run_score(settings, read_prompts(prompts, limit), out))
    if json_output:
        print(report.model_dump_json(indent=2))
    else:
        console.print(score_table(report))


@eval_app.command()
def ifeval(
    model: Annotated[str | None, typer.Option(help="Target to ask: `name` or `URL#model`.")] = None,
    responses: Annotated[
        Path | None,
        typer.Option(help="Score this JSONL of {prompt, response} instead of asking a target."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N prompts (after --instruction-type).")
    ] = None,
    instruction_type: Annotated[
        list[str] | None,
        typer.Option(
            help="Only prompts with an instruction id starting with this (repeatable), "
            "e.g. keywords or punctuation:no_comma."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for items.jsonl and summary.json.")] = Path(
        "runs/eval/ifeval"
    ),
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="Response token limit.")] = 1280,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt for the target.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """IFEval accuracy, prompt- and instruction-level, strict and loose (paper: prompt strict)."""
    if (model is None) == (responses is None):
        raise typer.BadParameter("give exactly one of --model or --responses")
    examples = ifeval_lib.load_examples(limit, instruction_type)
    if responses is not None:
        target = str(responses)
        result, items = ifeval_lib.evaluate_responses(
            examples, ifeval_lib.read_responses(responses)
        )
    else:
        endpoint = parse_target(model, base_url or default_base_url(), api_key)  # type: ignore[arg-type]
        target = _describe(endpoint)
        sampling = Sampling(temperature=temperature, max_tokens=max_tokens)
        result, items = _run(
            ifeval_lib.run_ifeval(endpoint, examples, sampling, concurrency, system_prompt)
        )
    report = IFEvalReport(
        target=target, limit=limit, instruction_types=instruction_type, result=result
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "items.jsonl").write_text("".join(item.model_dump_json() + "\n" for item in items))
    (out / "summary.json").write_text(report.model_dump_json(indent=2) + "\n")
    if json_output:
        print(report.model_dump_json(indent=2))
    else:
        console.print(ifeval_table(report))
