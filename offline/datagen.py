"""`dynalign datagen`: the paper's training-prompt generation (Section 2.2, Appendix A Tables 3-4).

Three roles, each any OpenAI-compatible endpoint: a goal model writes real-life goals one at a
time with its earlier goals in the chat history (for diversity); a prompt generator turns each
goal into a task prompt under the predefined criteria; a critic judges each prompt
Appropriate/Inappropriate, and an inappropriate prompt goes back to the generator with the
critique until it passes or the refinement limit is hit. Passing prompts too close to a kept one
(ROUGE-L F above a threshold, as in Self-Instruct) are dropped.

Output directory (append-only, so a run resumes where it stopped):
  goals.jsonl      every goal in generation order: the goal chain's history on restart
  prompts.jsonl    one PromptRecord per kept prompt: the dataset
  rejected.jsonl   PromptRecords for goals that hit the refinement limit or were duplicates
  report.json, rouge_l_pairwise.png, prompt_length.png   (the paper's Figure 3)
A goal is done once its record is in prompts.jsonl or rejected.jsonl; a restart redoes nothing
else and only continues the goal chain up to --num-goals.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import numpy as np
import openai
import typer
import yaml
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.files import read_jsonl
from shared.judge import (
    Endpoint,
    Sampling,
    chat,
    completion_text,
    default_base_url,
    parse_target,
)
from shared.prompts import (
    FEEDBACK_PROMPT,
    GOAL_PROMPT,
    INSTRUCTION_PROMPT,
    PREDEFINED_CRITERIA,
    REFINEMENT_PROMPT,
)
from shared.rouge import rouge_l_f, rouge_tokens

console = Console(stderr=True)


class Role(BaseModel):
    endpoint: Endpoint
    sampling: Sampling = Field(default_factory=Sampling)


class DatagenSettings(BaseModel):
    goal: Role
    generator: Role
    critic: Role
    num_goals: int = 1000
    # Earlier goals kept in the goal model's context. The paper keeps "the context of its
    # previous outputs" without a bound; ours bounds it so 1,000 goals fit a context window.
    goal_history: int = 50
    # Refinements after the first critique; the paper does not state its limit.
    max_refinements: int = 3
    rouge_l_threshold: float = 0.7
    concurrency: int = 8
    # The pairwise ROUGE-L histogram samples this many pairs when there are more.
    histogram_max_pairs: int = 200_000
    seed: int = 0


CritiqueVerdict = Literal["appropriate", "inappropriate", "unparsable"]
Status = Literal["kept", "rejected_round_limit", "duplicate"]


def _now() -> datetime:
    return datetime.now(UTC)


class GoalRecord(BaseModel):
    index: int
    goal: str
    model: str
    created_at: datetime = Field(default_factory=_now)


class CritiqueRound(BaseModel):
    round: int  # 0 = the first prompt, k = after the k-th refinement
    task_prompt: str
    critique: str
    verdict: CritiqueVerdict
    note: str | None = None
    at: datetime = Field(default_factory=_now)


class PromptRecord(BaseModel):
    schema_version: int = 1
    goal_index: int
    goal: str
    prompt: str
    status: Status
    appropriate: bool
    rounds: int
    critiques: list[CritiqueRound]
    max_rouge_l: float | None = None  # against the prompts kept before it
    duplicate_of: int | None = None  # goal_index of the closest kept prompt, for duplicates
    models: dict[str, str]
    started_at: datetime
    finished_at: datetime = Field(default_factory=_now)


class Distribution(BaseModel):
    count: int
    mean: float | None
    median: float | None
    p95: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not len(values):
            return cls(count=0, mean=None, median=None, p95=None, min=None, max=None)
        array = np.asarray(values, dtype=float)
        return cls(
            count=len(array),
            mean=float(array.mean()),
            median=float(np.median(array)),
            p95=float(np.percentile(array, 95)),
            min=float(array.min()),
            max=float(array.max()),
        )


class DatagenReport(BaseModel):
    goals: int  # goals done (kept + rejected by the round limit + duplicates)
    kept: int
    rejected_round_limit: int
    duplicates: int
    unparsable_critiques: int
    errors_this_run: int  # goals left undone by non-transient errors; a rerun retries them
    rounds_of_kept: dict[int, int]  # critique rounds needed -> kept prompts
    rouge_l_pairwise: Distribution
    prompt_words: Distribution
    figures: list[str]


# --- Parsing model output ------------------------------------------------------------------

_CONCLUSION = re.compile(
    r"in conclusion,?\s*this task prompt is\W{0,5}(inappropriate|appropriate)\b", re.IGNORECASE
)
_VERDICT_WORD = re.compile(r"\b(inappropriate|not appropriate|appropriate)\b", re.IGNORECASE)


def parse_critique(text: str) -> tuple[CritiqueVerdict, str | None]:
    """The verdict from "In conclusion, this task prompt is: X." (the last one, tolerating
    markdown and quotes); failing that, the one verdict word on the last line. Anything else is
    unparsable, which the pipeline treats as Inappropriate."""
    if found := _CONCLUSION.findall(text):
        return found[-1].lower(), None  # type: ignore[return-value]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    words = {w.lower() for w in _VERDICT_WORD.findall(lines[-1])} if lines else set()
    if len(words) == 1:
        word = words.pop()
        verdict: CritiqueVerdict = "appropriate" if word == "appropriate" else "inappropriate"
        return verdict, "no conclusion sentence; verdict read from the last line"
    return "unparsable", "no verdict found; treated as Inappropriate"


_PROMPT_LABEL = re.compile(r"^\W*(?:revised\s+)?task\s+prompt\W*", re.IGNORECASE)


def clean_task_prompt(text: str) -> str:
    """Drop an echoed '#Task Prompt#:' / '#Revised Task Prompt#:' label and wrapping quotes."""
    text = _PROMPT_LABEL.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def clean_goal(text: str) -> str:
    """First non-empty line, without list markers, a 'Task:' label or wrapping quotes."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", line)
    line = re.sub(r"^\W*(?:task|goal)\s*\d*\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'*").strip()


def criteria_for(goal: str) -> str:
    # "The task's goal is to {goal}": "Plan a trip" reads "to plan a trip". Acronyms stay.
    if len(goal) > 1 and goal[1].islower():
        goal = goal[0].lower() + goal[1:]
    return PREDEFINED_CRITERIA.format(goal=goal)


# --- Files ---------------------------------------------------------------------------------

Record = TypeVar("Record", bound=BaseModel)


def read_records(path: Path, model: type[Record]) -> list[Record]:
    """Records of a JSONL file; a line cut short by a crash is skipped."""
    if not path.exists():
        return []

    def unreadable(number: int, exc: ValueError) -> None:
        console.print(f"[yellow]skipping unreadable line {number} of {path}[/]")

    records = []
    for number, row in read_jsonl(path, unreadable):
        try:
            records.append(model.model_validate(row))
        except ValueError as exc:
            unreadable(number, exc)
    return records


class JsonlAppender:
    def __init__(self, path: Path) -> None:
        self.path = path
        # A crash can leave a partial last line; start on a fresh one so records stay whole.
        if path.exists() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
            if needs_newline:
                with path.open("a") as f:
                    f.write("\n")

    def append(self, record: BaseModel) -> None:
        with self.path.open("a") as f:
            f.write(record.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


class DatagenPaths(BaseModel):
    out_dir: Path

    @property
    def goals(self) -> Path:
        return self.out_dir / "goals.jsonl"

    @property
    def prompts(self) -> Path:
        return self.out_dir / "prompts.jsonl"

    @property
    def rejected(self) -> Path:
        return self.out_dir / "rejected.jsonl"

    @property
    def report(self) -> Path:
        return self.out_dir / "report.json"


# --- The pipeline --------------------------------------------------------------------------


class _Roles:
    """One client per role, closed together."""

    def __init__(self, settings: DatagenSettings) -> None:
        self.settings = settings
        self.clients = {
            name: getattr(settings, name).endpoint.client()
            for name in ("goal", "generator", "critic")
        }

    async def ask(self, role: str, messages: list[dict[str, str]]) -> str:
        spec: Role = getattr(self.settings, role)
        completion = await chat(
            self.clients[role],
            spec.endpoint.model,
            messages,
            **spec.sampling.as_params(),
        )
        return completion_text(completion)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


async def _next_goal(roles: _Roles, history: Sequence[GoalRecord]) -> str:
    messages: list[dict[str, str]] = []
    for earlier in history:
        messages += [
            {"role": "user", "content": GOAL_PROMPT},
            {"role": "assistant", "content": earlier.goal},
        ]
    messages.append({"role": "user", "content": GOAL_PROMPT})
    for _ in range(3):  # an empty answer is worth asking again; three in a row is a broken model
        if goal := clean_goal(await roles.ask("goal", messages)):
            return goal
    raise RuntimeError("the goal model returned empty goals three times in a row")


async def _refine_until_appropriate(roles: _Roles, goal: GoalRecord) -> PromptRecord:
    settings = roles.settings
    started = _now()
    criteria = criteria_for(goal.goal)
    raw = await roles.ask(
        "generator", [{"role": "user", "content": INSTRUCTION_PROMPT.format(criteria=criteria)}]
    )
    prompt = clean_task_prompt(raw)
    critiques: list[CritiqueRound] = []
    for round_index in range(settings.max_refinements + 1):
        # FEEDBACK_PROMPT has both [Response] and [Generated prompt] slots (Table 4); we read
        # [Response] as the generator's raw answer and [Generated prompt] as the cleaned prompt.
        feedback = FEEDBACK_PROMPT.format(criteria=criteria, response=raw, task_prompt=prompt)
        critique = await roles.ask("critic", [{"role": "user", "content": feedback}])
        verdict, note = parse_critique(critique)
        critiques.append(
            CritiqueRound(
                round=round_index, task_prompt=prompt, critique=critique, verdict=verdict, note=note
            )
        )
        if verdict == "appropriate" or round_index == settings.max_refinements:
            break
        refinement = REFINEMENT_PROMPT.format(
            criteria=criteria, task_prompt=prompt, critique=critique
        )
        raw = await roles.ask("generator", [{"role": "user", "content": refinement}])
        prompt = clean_task_prompt(raw)
    appropriate = critiques[-1].verdict == "appropriate"
    return PromptRecord(
        goal_index=goal.index,
        goal=goal.goal,
        prompt=prompt,
        status="kept" if appropriate else "rejected_round_limit",
        appropriate=appropriate,
        rounds=len(critiques),
        critiques=critiques,
        models={
            name: getattr(settings, name).endpoint.model for name in ("goal", "generator", "critic")
        },
        started_at=started,
    )


class _Deduper:
    def __init__(self, kept: Iterable[PromptRecord], threshold: float) -> None:
        self.threshold = threshold
        self.kept = [(r.goal_index, rouge_tokens(r.prompt)) for r in kept]

    def check(self, record: PromptRecord) -> PromptRecord:
        """Mark `record` a duplicate, or remember it as kept. Synchronous, so concurrent
        workers never compare against a list that misses a prompt kept meanwhile."""
        tokens = rouge_tokens(record.prompt)
        scores = [(rouge_l_f(tokens, other), index) for index, other in self.kept]
        best, closest = max(scores, default=(None, None))
        record.max_rouge_l = best
        # Self-Instruct's rule: a prompt is new while its ROUGE-L stays at or below the
        # threshold (0.7 there and by default here).
        if best is not None and best > self.threshold:
            record.status, record.duplicate_of = "duplicate", closest
        else:
            self.kept.append((record.goal_index, tokens))
        return record


async def run_datagen(
    settings: DatagenSettings, out_dir: Path, show_progress: bool = True
) -> DatagenReport:
    """Generate until `settings.num_goals` goals are done, resuming what `out_dir` holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = DatagenPaths(out_dir=out_dir)
    goals = read_records(paths.goals, GoalRecord)
    kept = read_records(paths.prompts, PromptRecord)
    done = {r.goal_index for r in kept} | {
        r.goal_index for r in read_records(paths.rejected, PromptRecord)
    }
    deduper = _Deduper(kept, settings.rouge_l_threshold)
    goal_log, kept_log, rejected_log = (
        JsonlAppender(p) for p in (paths.goals, paths.prompts, paths.rejected)
    )
    queue: asyncio.Queue[GoalRecord | None] = asyncio.Queue()
    for goal in goals[: settings.num_goals]:
        if goal.index not in done:
            queue.put_nowait(goal)
    errors = 0
    roles = _Roles(settings)

    progress = Progress(
        TextColumn("datagen"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("kept {task.fields[kept]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    bar = progress.add_task(
        "goals",
        total=settings.num_goals,
        completed=min(len(done), settings.num_goals),
        kept=len(kept),
    )

    async def produce_goals() -> None:
        for index in range(len(goals), settings.num_goals):
            text = await _next_goal(
                roles, goals[-settings.goal_history :] if settings.goal_history else []
            )
            goal = GoalRecord(index=index, goal=text, model=settings.goal.endpoint.model)
            goal_log.append(goal)
            goals.append(goal)
            await queue.put(goal)
        for _ in range(settings.concurrency):
            await queue.put(None)

    async def work() -> None:
        nonlocal errors
        while (goal := await queue.get()) is not None:
            try:
                record = await _refine_until_appropriate(roles, goal)
            except openai.APIError as error:  # retries exhausted or a request the server refuses
                errors += 1
                console.print(f"[red]goal {goal.index} left undone: {error}[/]")
                continue
            if record.appropriate:
                record = deduper.check(record)
            (kept_log if record.status == "kept" else rejected_log).append(record)
            progress.update(bar, advance=1, kept=len(deduper.kept))

    try:
        with progress:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce_goals())
                for _ in range(settings.concurrency):
                    group.create_task(work())
    except ExceptionGroup as failure:
        # The goal chain failing stops the run: surface its error rather than the group.
        raise failure.exceptions[0] from None
    finally:
        await roles.close()
    return write_report(out_dir, settings, errors_this_run=errors)


# --- Report --------------------------------------------------------------------------------


def pairwise_rouge_l(prompts: Sequence[str], max_pairs: int, seed: int = 0) -> list[float]:
    """ROUGE-L F of every pair of prompts, or of `max_pairs` pairs drawn at random."""
    tokens = [rouge_tokens(p) for p in prompts]
    n = len(tokens)
    total = n * (n - 1) // 2
    if total <= max_pairs:
        pairs: Iterable[tuple[int, int]] = ((i, j) for i in range(n) for j in range(i + 1, n))
    else:
        rng = random.Random(seed)
        pairs = (tuple(rng.sample(range(n), 2)) for _ in range(max_pairs))  # type: ignore[misc]
    return [rouge_l_f(tokens[i], tokens[j]) for i, j in pairs]


def _save_histogram(
    path: Path,
    values: Sequence[float],
    bins: Sequence[float] | str,
    title: str,
    xlabel: str,
    marker: float | None = None,
) -> None:
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(values, bins=bins, color="#3b6ea8", edgecolor="white")
    if marker is not None:
        axes.axvline(marker, color="#c0392b", linestyle="--", label=f"dedupe threshold {marker:g}")
        axes.legend()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_diversity_figures(
    prompts: Sequence[str], out_dir: Path, max_pairs: int, seed: int, threshold: float
) -> tuple[list[float], list[int], list[str]]:
    """The paper's Figure 3 for any prompt set: pairwise ROUGE-L and length histograms in
    out_dir. Returns the similarities, the lengths in words and the figures' file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    similarities = pairwise_rouge_l(prompts, max_pairs, seed)
    lengths = [len(p.split()) for p in prompts]
    rouge_png, length_png = out_dir / "rouge_l_pairwise.png", out_dir / "prompt_length.png"
    _save_histogram(
        rouge_png,
        similarities,
        np.linspace(0, 1, 21),
        f"Pairwise ROUGE-L of {len(prompts)} prompts",
        "ROUGE-L F",
        marker=threshold,
    )
    _save_histogram(length_png, lengths, "auto", f"Length of {len(prompts)} prompts", "words")
    return similarities, lengths, [rouge_png.name, length_png.name]


def write_report(
    out_dir: Path, settings: DatagenSettings, errors_this_run: int = 0
) -> DatagenReport:
    """Counts, the pairwise ROUGE-L and prompt-length figures, and report.json, from the files
    (so a resumed run reports on everything done so far)."""
    paths = DatagenPaths(out_dir=out_dir)
    kept = read_records(paths.prompts, PromptRecord)
    rejected = read_records(paths.rejected, PromptRecord)
    statuses = Counter(r.status for r in rejected)
    similarities, lengths, figures = write_diversity_figures(
        [r.prompt for r in kept],
        out_dir,
        settings.histogram_max_pairs,
        settings.seed,
        settings.rouge_l_threshold,
    )
    report = DatagenReport(
        goals=len(kept) + len(rejected),
        kept=len(kept),
        rejected_round_limit=statuses["rejected_round_limit"],
        duplicates=statuses["duplicate"],
        unparsable_critiques=sum(
            c.verdict == "unparsable" for r in kept + rejected for c in r.critiques
        ),
        errors_this_run=errors_this_run,
        rounds_of_kept=dict(sorted(Counter(r.rounds for r in kept).items())),
        rouge_l_pairwise=Distribution.of(similarities),
        prompt_words=Distribution.of(lengths),
        figures=figures,
    )
    paths.report.write_text(report.model_dump_json(indent=2) + "\n")
    return report


def report_table(report: DatagenReport) -> Table:
    table = Table(title="datagen")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name in (
        "goals",
        "kept",
        "rejected_round_limit",
        "duplicates",
        "unparsable_critiques",
        "errors_this_run",
    ):
        table.add_row(name, str(getattr(report, name)))
    for name, dist in (
        ("ROUGE-L pairwise", report.rouge_l_pairwise),
        ("prompt words", report.prompt_words),
    ):
        if dist.count:
            table.add_row(
                f"{name} mean / p95 / max", f"{dist.mean:.3f} / {dist.p95:.3f} / {dist.max:.3f}"
            )
    return table


# --- CLI -----------------------------------------------------------------------------------


def load_settings_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    return json.loads(text)


def datagen_command(
    out: Annotated[Path, typer.Option(help="Output directory; an existing one is resumed.")] = Path(
        "runs/datagen"
    ),
    model: Annotated[
        str | None, typer.Option(help="Target for all three roles: `name` or `URL#model`.")
    ] = None,
    goal_model: Annotated[
        str | None, typer.Option(help="Goal model target (default: --model).")
    ] = None,
    generator_model: Annotated[
        str | None, typer.Option(help="Prompt generator target (default: --model).")
    ] = None,
    critic_model: Annotated[
        str | None, typer.Option(help="Critic target (default: --model).")
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="Base URL for targets given as a bare name (default: the dynalign server)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="API key for every role.")
    ] = None,
    num_goals: Annotated[
        int | None, typer.Option(help="Goals to process in total (paper: 1,000 prompts).")
    ] = None,
    max_refinements: Annotated[
        int | None, typer.Option(help="Refinements after the first critique.")
    ] = None,
    rouge_threshold: Annotated[
        float | None,
        typer.Option(help="Drop prompts with ROUGE-L F above this against a kept one."),
    ] = None,
    goal_history: Annotated[
        int | None, typer.Option(help="Earlier goals kept in the goal model's context.")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(help="Goals refined at once.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Temperature for every role (default: the endpoint's).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Completion token limit for every role.")
    ] = None,
    settings_file: Annotated[
        Path | None,
        typer.Option(
            "--settings", help="DatagenSettings as YAML, TOML or JSON; flags override it."
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    diversity_of: Annotated[
        list[Path] | None,
        typer.Option(
            help="Generate nothing: draw the pairwise ROUGE-L and length figures of the "
            "prompts in these JSONL files (a `prompt` field) into --out."
        ),
    ] = None,
) -> None:
    """Generate CA training prompts: goals -> task prompts -> critique/refine -> dedupe."""
    if diversity_of:
        prompts = [row["prompt"] for path in diversity_of for _, row in read_jsonl(path)]
        defaults = {name: f.default for name, f in DatagenSettings.model_fields.items()}
        similarities, lengths, figures = write_diversity_figures(
            prompts,
            out,
            defaults["histogram_max_pairs"],
            defaults["seed"],
            rouge_threshold or defaults["rouge_l_threshold"],
        )
        summary = {
            "prompts": len(prompts),
            "rouge_l_pairwise": Distribution.of(similarities).model_dump(),
            "prompt_words": Distribution.of(lengths).model_dump(),
            "figures": [str(out / name) for name in figures],
        }
        print(json.dumps(summary, indent=2))
        return
    values = load_settings_file(settings_file) if settings_file else {}
    url = base_url or default_base_url()
    for role, spec in (
        ("goal", goal_model),
        ("generator", generator_model),
        ("critic", critic_model),
    ):
        if spec or model:
            endpoint = parse_target(spec or model, url, api_key)  # type: ignore[arg-type]
            values.setdefault(role, {})["endpoint"] = endpoint.model_dump()
        elif role not in values:
            raise typer.BadParameter(
                f"no target for the {role} role: give --model or --{role}-model"
            )
        sampling = values[role].setdefault("sampling", {})
        if temperature is not None:
            sampling["temperature"] = temperature
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
    flags = dict(
        num_goals=num_goals,
        max_refinements=max_refinements,
        rouge_l_threshold=rouge_threshold,
        goal_history=goal_history,
        concurrency=concurrency,
    )
    values.update({k: v for k, v in flags.items() if v is not None})
    settings = DatagenSettings.model_validate(values)
    try:
        report = asyncio.run(run_datagen(settings, out, show_progress=not no_progress))
    except openai.APIError as error:
        console.print(f"[red]datagen stopped: {error}[/] (run the same command again to resume)")
        raise typer.Exit(1) from None
    if json_output:
        print(report.model_dump_json(indent=2))
    else:
        Console().print(report_table(report))
