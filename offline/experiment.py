"""`dynalign experiment`: the paper's protocol (Section 3.1) against the running loop.

    traffic     simulated users send the train prompts through the OpenAI endpoint with the
                official client, as real users (logged: server -> Kafka -> learner -> registry
                -> hot swap), a few prompts ahead of the learner, until the budget is spent;
    evaluation  the base and the versions promoted on the way (at most --max-versions, evenly
                spaced, the last always) answer the held-out prompts;
                per version against base: the frozen judge's paired score difference, the
                pairwise consistent win rate (both orders), IFEval prompt-level accuracy, all
                with bootstrap 95% CIs; plus the gate's KL to base, the answer-length ratio and
                the gap between the learner's self-score and the frozen judge's score;
    report      alignment.json, report.png and summary.md in --out.

Every evaluation request carries the training opt-out (shared/judge.Endpoint), so the held-out
set never reaches the learner. Evaluation results are kept per target in --out, so a rerun after
an interruption evaluates only what is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import openai
import typer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from rich.console import Console
from rich.progress import Progress

from offline.evaluate import (
    PairwiseReport,
    PairwiseSettings,
    ScoreReport,
    ScoreSettings,
    read_prompts,
    run_pairwise,
    run_score,
)
from shared import ifeval as ifeval_lib
from shared.config import load_config
from shared.gate_result import GateResult
from shared.judge import (
    Endpoint,
    JudgeSettings,
    Response,
    Sampling,
    bootstrap_mean_ci,
    collect_responses,
    default_base_url,
    parse_target,
)
from shared.lifecycle import Lifecycle
from shared.registry import Registry

console = Console()
DATA = resources.files("shared") / "data" / "ca_prompts"


class VersionResult(BaseModel):
    version: int | None  # None = the base model
    steps: int
    self_reward: float | None  # the learner's own mean score at this version's checkpoint
    score: float | None  # the frozen judge's mean score on the held-out prompts
    score_diff: float | None  # vs base, paired
    score_diff_ci: tuple[float | None, float | None]
    win_rate: float | None  # vs base, consistent pairs
    win_rate_ci: tuple[float | None, float | None]
    inconsistent_share: float | None
    ifeval_strict: float
    ifeval_strict_ci: tuple[float, float]
    ifeval_loose: float
    length_ratio: float | None  # answer words, version / base
    truncated_share: float | None = None  # held-out answers cut by the token limit
    kl_to_base: float | None  # the gate's, on its probe prompts
    self_vs_frozen_gap: float | None  # self_reward - score: a reward-hacking signal


class GateRecord(BaseModel):
    """The gate's verdict on a promoted version: the frozen judge's paired score of candidate
    minus the version live before it, on the gate's probe prompts."""

    version: int
    outcome: str | None
    score_diff: float | None
    score_diff_ci: tuple[float | None, float | None]
    score_margin: float | None

    @classmethod
    def of(cls, version: int, gate: GateResult | None) -> GateRecord:
        """A version promoted by an operator without a verdict has None throughout."""
        if gate is None:
            return cls(
                version=version,
                outcome=None,
                score_diff=None,
                score_diff_ci=(None, None),
                score_margin=None,
            )
        return cls(
            version=version,
            outcome=gate.outcome,
            score_diff=gate.score_diff,
            score_diff_ci=gate.score_diff_ci,
            score_margin=gate.score_margin,
        )


class RewardPoint(BaseModel):
    """The learner's own mean self-reward at a checkpoint it published."""

    version: int
    steps: int
    self_reward: float


class ExperimentReport(BaseModel):
    base_url: str
    judge: str
    heldout_prompts: int
    ifeval_prompts: int
    traffic: dict[str, Any]
    evaluation_seconds: float  # summed over the invocations of a resumed run
    promoted: list[GateRecord]  # every version that went live, in order
    reward_curve: list[RewardPoint]  # every version the learner published
    versions: list[VersionResult]  # base and up to --max-versions of them, evaluated


def learner_metric(metrics_url: str, name: str) -> float | None:
    """A sample's value on the learner's /metrics; 0 before it has one; None when the learner
    does not answer (not up yet, or too busy to within 5 s)."""
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


async def drive_traffic(
    base_url: str,
    api_key: str,
    prompts: list[str],
    metrics_url: str,
    budget_steps: int,
    budget_s: float,
    users: int,
    ahead: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Send the prompts round-robin as `users` simulated users, at most `ahead` prompts beyond
    what the learner has consumed (so the server does not take the CPU the learner needs),
    until the learner has taken `budget_steps` steps or `budget_s` seconds have passed. The
    learner replays each prompt G times and never sees these answers, so `max_tokens` keeps
    them short: on a CPU they take the cores the learner steps on."""
    # A plain client: this is user traffic, to be learned from (Endpoint.client() opts out).
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=6)

    def counter(name: str) -> float:  # 0 while the learner does not answer
        return learner_metric(metrics_url, name) or 0.0

    steps_at_start = counter("dynalign_learner_steps_total")
    consumed_at_start = counter("dynalign_learner_records_consumed_total")
    started, sent = time.monotonic(), 0
    cycle = itertools.cycle(enumerate(prompts))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learner steps", total=budget_steps)
        while True:
            steps = counter("dynalign_learner_steps_total") - steps_at_start
            progress.update(task, completed=steps)
            if steps >= budget_steps or time.monotonic() - started > budget_s:
                break
            consumed = counter("dynalign_learner_records_consumed_total") - consumed_at_start
            wanted = max(0, int(consumed) + ahead - sent)
            batch = [next(cycle) for _ in range(wanted)]
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="dynalign",
                        user=f"simulated-user-{i % users}",
                        max_tokens=max_tokens,
                        messages=[{"role": "user", "content": prompt}],
                    )
                    for i, prompt in batch
                )
            )
            sent += len(batch)
            await asyncio.sleep(2.0)  # the learner's metrics move once per step
    await client.close()
    return {
        "prompts_sent": sent,
        "learner_steps": int(steps),
        "seconds": time.monotonic() - started,
    }


def promoted_versions(registry: Registry) -> list[int]:
    """Versions that went live, in the order they did."""
    seen: list[int] = []
    for entry in registry.audit_log():
        if entry.action in ("promote", "promote-override") and entry.to_version not in seen:
            seen.append(entry.to_version)
    return [v for v in seen if v is not None]


def spread(versions: list[int], most: int) -> list[int]:
    """At most `most` of `versions`, evenly spaced from the last back to the first: a CPU run
    can promote a version every few steps, and evaluating each would outlast training."""
    if len(versions) <= most:
        return versions
    picks = np.linspace(len(versions) - 1, 0, most).round().astype(int)
    return [versions[i] for i in sorted(set(picks))]


def wait_for_idle_learner(metrics_url: str, timeout_s: float, silent_s: float = 30.0) -> None:
    """Until the learner's step in flight (and its gate) is done. A learner that does not answer
    its /metrics may be busy: waited for, up to `silent_s` in a row (then there is none)."""
    deadline = time.monotonic() + timeout_s
    silent_since = None
    with console.status("waiting for the learner's step in flight"):
        while (in_flight := learner_metric(metrics_url, "dynalign_learner_step_in_flight")) != 0:
            now = time.monotonic()
            silent_since = (silent_since or now) if in_flight is None else None
            if silent_since is not None and now - silent_since > silent_s:
                return  # no learner running
            if now > deadline:
                console.print("[yellow]the learner's step outlasted the wait; evaluating")
                return
            time.sleep(2.0)  # a gauge on another process's /metrics: polled


@contextmanager
def learning_paused(
    lifecycle: Lifecycle, metrics_url: str, timeout_s: float = 900.0
) -> Iterator[None]:
    """The learner waits while versions are evaluated: its steps would take the CPU the
    evaluation needs. Paused and resumed as an operator would (audited); a pause an operator
    set before stays. Yields once the learner's step in flight (and its gate) is done, so the
    last version it publishes is gated before the registry is read."""
    mine = not lifecycle.state().learning_paused
    if mine:
        lifecycle.set_flag("pause-learning", "experiment", "held-out evaluation")
    try:
        wait_for_idle_learner(metrics_url, timeout_s)
        yield
    finally:
        if mine:
            lifecycle.set_flag("resume-learning", "experiment", "held-out evaluation done")


def _cached(path: Path, model: type[BaseModel], compute) -> Any:
    if path.exists():
        return model.model_validate_json(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value.model_dump_json(indent=2) + "\n")
    return value


class IFEvalSummary(BaseModel):
    strict: float
    strict_ci: tuple[float, float]
    loose: float
    per_prompt_strict: list[bool]


class HeldoutAnswers(BaseModel):
    answers: list[Response]


def heldout_answers(
    target: Endpoint, heldout: list[str], sampling: Sampling, concurrency: int, out: Path
):
    """A target's greedy answers to the held-out prompts: asked once, for both the score and
    the pairwise comparison, and kept for a resumed run."""
    return _cached(
        out,
        HeldoutAnswers,
        lambda: HeldoutAnswers(
            answers=asyncio.run(collect_responses(target, heldout, sampling, concurrency))
        ),
    ).answers


def evaluate_version(
    version: int | None,
    registry: Registry,
    out: Path,
    endpoint: Endpoint,
    judge: Endpoint,
    heldout: list[str],
    ifeval_examples: list,
    sampling: Sampling,
    resamples: int,
    concurrency: int,
) -> VersionResult:
    name = "base" if version is None else f"v{version}"
    target = endpoint.model_copy(update={"model": f"dynalign@{name}"})
    base = endpoint.model_copy(update={"model": "dynalign@base"})
    answers = [
        heldout_answers(t, heldout, sampling, concurrency, out / n / "heldout-answers.json")
        for t, n in ((target, name), (base, "base"))
    ]

    def ifeval() -> IFEvalSummary:
        result, items = asyncio.run(
            ifeval_lib.run_ifeval(target, ifeval_examples, sampling, concurrency)
        )
        strict = [all(i.follow_strict) for i in items]
        _, low, high = bootstrap_mean_ci(strict, resamples)
        return IFEvalSummary(
            strict=result.prompt_level_strict,
            strict_ci=(low, high),
            loose=result.prompt_level_loose,
            per_prompt_strict=strict,
        )

    ife = _cached(out / name / "ifeval.json", IFEvalSummary, ifeval)
    manifest = registry.manifest(version) if version is not None else None
    gate = registry.read_state().gate_results.get(version) if version is not None else None
    if version is None:
        score_report = pairwise_report = None
    else:
        score_report = _cached(
            out / name / "score.json",
            ScoreReport,
            lambda: asyncio.run(
                run_score(
                    ScoreSettings(
                        a=target,
                        b=base,
                        judge=judge,
                        response_sampling=sampling,
                        n_resamples=resamples,
                        concurrency=concurrency,
                    ),
                    heldout,
                    out / name / "score",
                    answers,
                )
            ),
        )
        pairwise_report = _cached(
            out / name / "pairwise.json",
            PairwiseReport,
            lambda: asyncio.run(
                run_pairwise(
                    PairwiseSettings(
                        a=target,
                        b=base,
                        judge=JudgeSettings(endpoint=judge, use_logprobs=True),
                        response_sampling=sampling,
                        n_resamples=resamples,
                        concurrency=max(1, concurrency // 2),  # a pair asks both orders at once
                    ),
                    heldout,
                    out / name / "pairwise",
                    answers,
                )
            ),
        )
    summary = pairwise_report.summary if pairwise_report else None
    self_reward = manifest.metrics.get("reward_mean") if manifest else None
    score = score_report.mean_a if score_report else None
    return VersionResult(
        version=version,
        steps=manifest.steps if manifest else 0,
        self_reward=self_reward,
        score=score,
        score_diff=score_report.diff if score_report else None,
        score_diff_ci=(score_report.ci_low, score_report.ci_high) if score_report else (None, None),
        win_rate=summary.win_rate if summary else None,
        win_rate_ci=(summary.ci_low, summary.ci_high) if summary else (None, None),
        inconsistent_share=summary.inconsistent / summary.n if summary and summary.n else None,
        ifeval_strict=ife.strict,
        ifeval_strict_ci=ife.strict_ci,
        ifeval_loose=ife.loose,
        length_ratio=score_report.words_ratio if score_report else None,
        truncated_share=score_report.truncated_a if score_report else None,
        kl_to_base=gate.kl if gate else None,
        self_vs_frozen_gap=self_reward - score
        if self_reward is not None and score is not None
        else None,
    )


def evaluation_time(out: Path, seconds: float) -> float:
    """This invocation's evaluation seconds added to those of the runs it resumes."""
    path = out / "experiment" / "evaluation-seconds.json"
    total = (json.loads(path.read_text())["seconds"] if path.exists() else 0.0) + seconds
    path.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def write_report(report: ExperimentReport, out: Path) -> None:
    """alignment.json, report.png (self-reward by step, held-out score vs base, win rate vs
    base, IFEval, each version with its 95% CI) and summary.md."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    (out / "alignment.json").write_text(report.model_dump_json(indent=2) + "\n")
    rows = report.versions
    names = ["base" if r.version is None else f"v{r.version}" for r in rows]
    figure = Figure(figsize=(11, 7), dpi=100)
    FigureCanvasAgg(figure)
    (curve, score), (wins, ife) = figure.subplots(2, 2)
    points = report.reward_curve
    curve.plot([p.steps for p in points], [p.self_reward for p in points], marker="o")
    for p in points:
        curve.annotate(f"v{p.version}", (p.steps, p.self_reward), textcoords="offset points",
                       xytext=(0, 6), ha="center")  # fmt: skip
    curve.set(title="training: self-reward at each published version", xlabel="learner step",
              ylabel="0-5")  # fmt: skip

    def bars(axes, values, cis, title, ylabel):
        x = np.arange(len(rows))
        heights = [np.nan if v is None else v for v in values]
        low = [
            0 if v is None or c[0] is None else v - c[0] for v, c in zip(values, cis, strict=True)
        ]
        high = [
            0 if v is None or c[1] is None else c[1] - v for v, c in zip(values, cis, strict=True)
        ]
        axes.bar(x, heights, yerr=[low, high], capsize=4, color="#3b6ea8")
        axes.set_xticks(x, names)
        axes.set(title=title, ylabel=ylabel, xlim=(-0.5, len(rows) - 0.5))

    bars(
        score,
        [r.score_diff for r in rows],
        [r.score_diff_ci for r in rows],
        "held-out CA score vs base (frozen judge)",
        "difference, 0-5 scale",
    )
    score.axhline(0, color="grey", linewidth=0.8)
    bars(
        wins,
        [r.win_rate for r in rows],
        [r.win_rate_ci for r in rows],
        "consistent win rate vs base",
        "share of consistent pairs",
    )
    wins.axhline(0.5, color="grey", linewidth=0.8)
    wins.set_ylim(0, 1)
    for x, r in enumerate(rows):
        if r.version is not None and r.win_rate is None and r.inconsistent_share is not None:
            wins.text(x, 0.5, f"no consistent pair\n({r.inconsistent_share:.0%} inconsistent)",
                      ha="center", va="bottom")  # fmt: skip
    bars(
        ife,
        [r.ifeval_strict for r in rows],
        [r.ifeval_strict_ci for r in rows],
        f"IFEval prompt-level strict ({report.ifeval_prompts} prompts)",
        "accuracy",
    )
    figure.tight_layout()
    figure.savefig(out / "report.png", format="png")

    def cell(value, ci=None, fmt="{:+.3f}"):
        if value is None:
            return "-"
        text = fmt.format(value)
        if ci and ci[0] is not None:
            text += f" ({fmt.format(ci[0])} .. {fmt.format(ci[1])})"
        return text

    lines = [
        "# dynalign experiment",
        "",
        f"Held-out prompts: {report.heldout_prompts}; frozen judge: {report.judge}; IFEval: "
        f"{report.ifeval_prompts} prompts. Traffic: {report.traffic}. Evaluation: "
        f"{report.evaluation_seconds / 60:.0f} min. 95% bootstrap CIs.",
        "",
        "| version | steps | score vs base | win rate vs base | inconsistent | IFEval strict "
        "| length ratio | truncated | KL to base | self - frozen |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for name, r in zip(names, rows, strict=True):
        lines.append(
            f"| {name} | {r.steps} | {cell(r.score_diff, r.score_diff_ci)} "
            f"| {cell(r.win_rate, r.win_rate_ci, '{:.2f}')} "
            f"| {cell(r.inconsistent_share, fmt='{:.0%}')} "
            f"| {cell(r.ifeval_strict, r.ifeval_strict_ci, '{:.3f}')} "
            f"| {cell(r.length_ratio, fmt='{:.2f}')} | {cell(r.truncated_share, fmt='{:.0%}')} "
            f"| {cell(r.kl_to_base, fmt='{:.4f}')} "
            f"| {cell(r.self_vs_frozen_gap)} |"
        )
    if report.promoted:
        lines += [
            "",
            f"Gate verdicts on the {len(report.promoted)} promoted versions (frozen judge, "
            "candidate - the live version before it, on the probe prompts):",
            ", ".join(
                f"v{g.version} {cell(g.score_diff, g.score_diff_ci, '{:+.2f}')} {g.outcome}"
                for g in report.promoted
            ),
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def experiment_command(
    out: Annotated[Path, typer.Option(help="Directory for the results (a rerun resumes).")] = Path(
        "bench/results"
    ),
    budget_steps: Annotated[int, typer.Option(help="Learner steps of traffic.")] = 40,
    budget_minutes: Annotated[
        float, typer.Option(help="... or at most this long (evaluation comes after).")
    ] = 35.0,
    max_versions: Annotated[
        int,
        typer.Option(
            help="Promoted versions evaluated: evenly spaced, the last always. Each costs "
            "about 25 minutes on a 2-core CPU (SmolLM2)."
        ),
    ] = 1,
    train_prompts: Annotated[Path | None, typer.Option(help="Default: the shipped set.")] = None,
    heldout_prompts: Annotated[Path | None, typer.Option(help="Default: the shipped 100.")] = None,
    heldout_limit: Annotated[int | None, typer.Option(help="Only the first N.")] = None,
    ifeval_prompts: Annotated[int, typer.Option(help="IFEval subset size (541 = all).")] = 200,
    judge: Annotated[
        str, typer.Option(help="Frozen judge: `name` or `URL#model`.")
    ] = "dynalign@base",
    users: Annotated[int, typer.Option(help="Simulated users.")] = 4,
    ahead: Annotated[int, typer.Option(help="Prompts sent beyond the learner's reading.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Answer token limit (evaluation).")] = 256,
    traffic_max_tokens: Annotated[
        int, typer.Option(help="Answer token limit for the simulated users.")
    ] = 64,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Evaluation requests in flight (the learner is paused then). Default: the "
            "server's per-client limit, serving.max_concurrent_per_client."
        ),
    ] = None,
    skip_traffic: Annotated[
        bool, typer.Option("--skip-traffic", help="Evaluate what the registry holds now.")
    ] = False,
    base_url: Annotated[str | None, typer.Option(help="Default: the dynalign server.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    judge_api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DYNALIGN_JUDGE_API_KEY",
            help="For a `URL#model` judge (default: OPENAI_API_KEY); a judge on the dynalign "
            "server gets --api-key.",
        ),
    ] = None,
) -> None:
    """The paper's protocol on the running loop (`dynalign up` in another terminal): train
    traffic for a budget, then every promoted version and base on held-out prompts."""
    cfg = load_config()
    concurrency = concurrency or cfg.serving.max_concurrent_per_client
    url = base_url or default_base_url()
    key = api_key or "EMPTY"
    registry = Registry(cfg.registry.store)
    metrics_url = f"http://127.0.0.1:{cfg.learner.metrics_port}/metrics"
    out.mkdir(parents=True, exist_ok=True)
    traffic_file = out / "experiment-traffic.json"
    if not skip_traffic and not traffic_file.exists():
        traffic = asyncio.run(
            drive_traffic(
                url,
                key,
                read_prompts(train_prompts or Path(str(DATA / "train.jsonl"))),
                metrics_url,
                budget_steps,
                budget_minutes * 60,
                users,
                ahead,
                traffic_max_tokens,
            )
        )
        traffic_file.write_text(json.dumps(traffic) + "\n")
    traffic = json.loads(traffic_file.read_text()) if traffic_file.exists() else {}
    heldout = read_prompts(heldout_prompts or Path(str(DATA / "heldout.jsonl")), heldout_limit)
    examples = ifeval_lib.load_examples(limit=ifeval_prompts)
    endpoint = parse_target("dynalign@base", url, key)
    judge_endpoint = parse_target(judge, url, judge_api_key if "#" in judge else key)
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    evaluation_started = time.monotonic()
    with learning_paused(Lifecycle(registry), metrics_url):
        promoted = promoted_versions(registry)
        verdicts = registry.read_state().gate_results
        gates = [GateRecord.of(v, verdicts.get(v)) for v in promoted]
        versions: list[int | None] = [None, *spread(promoted, max_versions)]
        rows = []
        with Progress(console=console) as progress:
            task = progress.add_task("evaluating versions", total=len(versions))
            for version in versions:
                rows.append(
                    evaluate_version(
                        version,
                        registry,
                        out / "experiment",
                        endpoint,
                        judge_endpoint,
                        heldout,
                        examples,
                        sampling,
                        resamples,
                        concurrency,
                    )
                )
                progress.advance(task)
    if len(rows) > 1:  # the base's answers are B in every version's score report
        first = out / "experiment" / f"v{rows[1].version}" / "score.json"
        rows[0].truncated_share = ScoreReport.model_validate_json(first.read_text()).truncated_b
    report = ExperimentReport(
        base_url=url,
        judge=judge,
        heldout_prompts=len(heldout),
        ifeval_prompts=len(examples),
        traffic=traffic,
        evaluation_seconds=evaluation_time(out, time.monotonic() - evaluation_started),
        promoted=gates,
        reward_curve=[
            RewardPoint(version=v, steps=m.steps, self_reward=m.metrics["reward_mean"])
            for v in registry.versions()
            if "reward_mean" in (m := registry.manifest(v)).metrics
        ],
        versions=rows,
    )
    write_report(report, out)
    console.print((out / "summary.md").read_text())
