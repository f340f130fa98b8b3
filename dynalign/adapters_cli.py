"""`dynalign adapters ...`: operate the adapter registry from a shell.

Works on the registry files directly (the truth) and announces each change on the control topic
when Kafka is configured, so running servers switch within a second; servers without the topic
converge on their next poll of the files. The same actions are HTTP routes under /admin.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dynalign.settings import config_or_exit
from shared.config import DynalignConfig
from shared.lifecycle import Lifecycle
from shared.registry import Registry, RegistryError, RegistryState

adapters_app = typer.Typer(no_args_is_help=True, help=__doc__)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config")]
StoreOpt = Annotated[Path | None, typer.Option("--store", help="Adapter store directory.")]
KafkaOpt = Annotated[str | None, typer.Option("--kafka")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Recorded in the audit log.")]


def _setup(
    config: Path | None, store: Path | None, kafka: str | None
) -> tuple[DynalignConfig, Lifecycle]:
    cfg = config_or_exit(config, registry={"store": store}, kafka={"bootstrap": kafka})
    return cfg, Lifecycle.from_config(cfg)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _versions(registry: Registry, state: RegistryState) -> list[dict]:
    return [
        {
            "version": v,
            "state": state.states.get(v, "candidate"),
            "gate": state.gate_json(v),
            **registry.manifest(v).model_dump(mode="json", exclude={"version"}),
        }
        for v in registry.versions()
    ]


def _finish(state: RegistryState, action: str, as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "live": state.live,
                    "pinned": state.pinned,
                    "learning_paused": state.learning_paused,
                    "canary": state.canary and state.canary.model_dump(mode="json"),
                    "revision": state.revision,
                }
            )
        )
    else:
        live = "base" if state.live is None else f"v{state.live}"
        console.print(
            f"{action}: live is now [bold]{live}[/bold]"
            + (" (pinned)" if state.pinned else "")
            + (f" ; {_canary_summary(state)}" if state.canary else "")
            + (" ; learning paused" if state.learning_paused else "")
        )


def _canary_summary(state: RegistryState) -> str:
    c = state.canary
    return (
        f"canary v{c.version} on {c.share:.0%} of users (since {c.started_at:%Y-%m-%d %H:%M}, "
        f"{c.min_ratings}-{c.max_ratings} ratings per arm, margin {c.margin:.2f})"
    )


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


@adapters_app.command("list")
def list_versions(config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False):
    """Every version with its state; the live one marked."""
    registry = _setup(config, store, None)[1].registry
    state = registry.read_state()
    rows = _versions(registry, state)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "live": state.live,
                    "pinned": state.pinned,
                    "learning_paused": state.learning_paused,
                    "canary": state.canary and state.canary.model_dump(mode="json"),
                    "versions": rows,
                }
            )
        )
        return
    table = Table(
        title=f"adapters in {registry.root}  (live: "
        f"{'base' if state.live is None else f'v{state.live}'})"
    )
    for column in ("version", "state", "gate", "parent", "steps", "reward", "kl", "created"):
        table.add_column(column)
    for row in rows:
        m = row["metrics"]
        table.add_row(
            f"v{row['version']}",
            row["state"],
            _gate_summary(row["gate"]),
            str(row["parent_version"] or "-"),
            str(row["steps"]),
            f"{m.get('reward_mean', float('nan')):.2f}",
            f"{m.get('kl', float('nan')):.4f}",
            row["created_at"][:19],
        )
    console.print(table)
    if state.canary:
        console.print(_canary_summary(state))


def _gate_summary(gate: dict | None) -> str:
    """'pass +0.12 [-0.01, +0.25]': the outcome and the frozen-judge score vs live with its CI."""
    if not gate or "outcome" not in gate:  # not judged (yet), or judged before evidence CIs
        return "-"
    low, high = gate["score_diff_ci"]
    return f"{gate['outcome']} {gate['score_diff']:+.2f} [{low:+.2f}, {high:+.2f}]"


@adapters_app.command()
def show(version: int, config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False):
    """One version's manifest and state."""
    registry = _setup(config, store, None)[1].registry
    try:
        manifest = registry.manifest(version)
    except FileNotFoundError:
        _fail(RegistryError(f"v{version} does not exist"))
    state = registry.read_state()
    data = {
        "state": state.states.get(version, "candidate"),
        "gate": state.gate_json(version),
        **manifest.model_dump(mode="json"),
    }
    typer.echo(json.dumps(data, indent=None if as_json else 2))


@adapters_app.command()
def diff(
    a: int, b: int, config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False
):
    """How two versions differ: manifest fields and the weight change per tensor (L2 norm)."""
    from safetensors.torch import load_file

    registry = _setup(config, store, None)[1].registry
    ma, mb = registry.manifest(a), registry.manifest(b)
    fields = {
        k: [getattr(ma, k), getattr(mb, k)]
        for k in ("parent_version", "steps", "metrics", "trained_offsets", "base_model")
        if getattr(ma, k) != getattr(mb, k)
    }
    wa = load_file(str(registry.path(a) / "adapter_model.safetensors"))
    wb = load_file(str(registry.path(b) / "adapter_model.safetensors"))
    deltas = {k: float((wb[k] - wa[k]).norm()) for k in sorted(wa) if k in wb}
    total = sum(d * d for d in deltas.values()) ** 0.5
    if as_json:
        typer.echo(
            json.dumps({"fields": fields, "weight_delta_l2": total, "tensors": deltas}, default=str)
        )
        return
    for key, (x, y) in fields.items():
        console.print(f"{key}: v{a}={x}  v{b}={y}")
    console.print(f"weight change (L2 over {len(deltas)} tensors): {total:.6f}")
    for key, value in sorted(deltas.items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"  {value:.6f}  {key}")


@adapters_app.command()
def promote(
    version: int,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    kafka: KafkaOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
    override: Annotated[
        bool, typer.Option("--override", help="Promote a rejected version (audited as such).")
    ] = False,
):
    """Make VERSION live (after checking it can be served)."""
    from shared.models import resolve_model_path
    from shared.registry import base_fingerprint

    cfg, lifecycle = _setup(config, store, kafka)
    try:
        problems = lifecycle.servable_problems(
            version, base_fingerprint(resolve_model_path(cfg.model)), cfg.model.max_lora_rank
        )
        if problems:
            raise RegistryError("; ".join(problems))
        state = lifecycle.promote(version, _actor(), reason, override=override)
    except RegistryError as exc:
        _fail(exc)
    _finish(state, "promote", as_json)


@adapters_app.command()
def rollback(
    to: Annotated[int | None, typer.Option("--to", help="Default: the previous live.")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    kafka: KafkaOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
):
    """Move live back to the previous version (or --to vN, a version that was live)."""
    _, lifecycle = _setup(config, store, kafka)
    try:
        state = lifecycle.rollback(_actor(), to=to, reason=reason)
    except RegistryError as exc:
        _fail(exc)
    _finish(state, "rollback", as_json)


@adapters_app.command()
def canary(
    version: Annotated[int | None, typer.Argument(help="Start VERSION as the canary.")] = None,
    share: Annotated[
        float | None,
        typer.Option("--share", help="Of the main alias's users (default: gate.canary_share)."),
    ] = None,
    stop: Annotated[
        bool, typer.Option("--stop", help="End it; the version is a candidate again.")
    ] = False,
    extend: Annotated[
        int | None, typer.Option("--extend", help="A later horizon: ratings per arm.")
    ] = None,
    decide: Annotated[
        str | None, typer.Option("--decide", help="Force the decision: promote or rollback.")
    ] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    kafka: KafkaOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
):
    """Try a candidate on a share of live traffic (sticky per user, on every replica) until the
    canary rule decides on users' ratings (shared/canary.py); or stop, extend, decide it."""
    cfg, lifecycle = _setup(config, store, kafka)
    chosen = [version is not None, stop, extend is not None, decide is not None]
    if sum(chosen) != 1:
        _fail(RegistryError("give one of: VERSION (with --share), --stop, --extend N, --decide"))
    if decide not in (None, "promote", "rollback"):
        _fail(RegistryError(f"--decide promote or rollback, not {decide!r}"))
    try:
        if version is not None:
            rule = cfg.gate.canary_rule(share)
            if not rule["share"]:
                raise RegistryError("--share is needed (gate.canary_share is 0)")
            state = lifecycle.start_canary(version, rule, _actor(), reason)
        elif stop:
            state = lifecycle.end_canary("stop", _actor(), reason)
        elif extend is not None:
            state = lifecycle.extend_canary(extend, _actor(), reason)
        else:
            state = lifecycle.end_canary(decide, _actor(), reason or f"operator: {decide}")
    except (RegistryError, ValueError) as exc:
        _fail(exc)
    _finish(state, "canary", as_json)


def _flag_command(action: str, doc: str) -> None:
    def command(
        config: ConfigOpt = None,
        store: StoreOpt = None,
        kafka: KafkaOpt = None,
        reason: ReasonOpt = "",
        as_json: JsonOpt = False,
    ):
        _, lifecycle = _setup(config, store, kafka)
        _finish(lifecycle.set_flag(action, _actor(), reason), action, as_json)

    command.__doc__ = doc
    adapters_app.command(action)(command)


_flag_command("pin", "Keep live where it is: the gate may not promote.")
_flag_command("unpin", "Let the gate promote again.")
_flag_command("pause-learning", "Stop the learner taking steps.")
_flag_command("resume-learning", "Let the learner step again.")
