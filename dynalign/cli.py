"""`dynalign` — one entry point for every process of the loop.

dynalign up      broker (embedded unless --kafka) + server + learner on one machine
dynalign serve   the OpenAI-compatible chat server
dynalign learn   the self-rewarding GRPO learner
dynalign datagen the paper's task-prompt generation
dynalign eval    frozen-judge score | pairwise CA judgement | IFEval
dynalign experiment  the paper's protocol on the running loop, with CIs
dynalign adapters list | show | diff | promote | rollback | pin | unpin
                 | pause-learning | resume-learning
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynalign.adapters_cli import adapters_app
from dynalign.log_cli import log_app
from dynalign.settings import config_or_exit
from dynalign.supervisor import Supervisor, ending_descendants
from offline.datagen import datagen_command
from offline.evaluate import eval_app
from offline.experiment import experiment_command
from shared.config import DynalignConfig
from shared.process import die_with_parent

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command("datagen")(datagen_command)
app.command("experiment")(experiment_command)
app.add_typer(eval_app, name="eval", help="Pairwise CA judgement and IFEval.")
app.add_typer(adapters_app, name="adapters", help="List, promote, roll back, pin adapters.")
app.add_typer(log_app, name="log", help="Export the interaction log.")
console = Console()
log = logging.getLogger("dynalign")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML or YAML config file.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Hub id or local path (default: SmolLM2-135M-Instruct from PyPI)."
    ),
]
KafkaOpt = Annotated[
    str | None, typer.Option("--kafka", help="Kafka bootstrap servers (host:port,...).")
]
HostOpt = Annotated[str | None, typer.Option("--host")]
PortOpt = Annotated[int | None, typer.Option("--port")]
EngineArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--engine-arg",
        help="Any `vllm serve` engine flag as KEY=VALUE (repeatable), e.g. "
        "max_num_seqs=64; checked by vLLM's own parser.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="DYNALIGN_DATA_DIR",
        help="All state: outbox and log, registry, checkpoints (default: a per-user directory).",
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure-no-auth", help="Serve a non-loopback address without API keys.")
]


def _engine_args(pairs: list[str] | None) -> dict:
    """KEY=VALUE pairs; VALUE read as JSON when it is JSON (64, false, {"a": 1}), else text."""
    parsed = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--engine-arg")
        try:
            parsed[key.strip()] = json.loads(value)
        except ValueError:
            parsed[key.strip()] = value
    return parsed


def _config(
    config: Path | None,
    model: str | None,
    kafka: str | None,
    host: str | None,
    port: int | None,
    engine_args: list[str] | None = None,
    insecure_no_auth: bool = False,
    data_dir: Path | None = None,
) -> DynalignConfig:
    cfg = config_or_exit(
        config,
        data_dir,
        model={"path": model},
        kafka={"bootstrap": kafka},
        serving={"host": host, "port": port, "insecure_no_auth": insecure_no_auth or None},
    )
    cfg.model.engine_args = {**cfg.model.engine_args, **_engine_args(engine_args)}
    return cfg


def _refuse(exc: Exception) -> None:
    """A configuration the server must not run with: say why, exit non-zero."""
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _outbox(cfg: DynalignConfig, retain: bool = False, embedded: bool = False):
    """The server's interaction outbox (serving/outbox.py), forwarding to cfg.kafka, or to
    `up`'s embedded Tansu (`embedded`), which needs a batch per record."""
    from serving.outbox import Outbox
    from shared.files import DirectoryInUse
    from shared.kafka import EmbeddedBroker, ensure_topics, producer

    def connect():
        # Called on every (re)connect: a broker that came back empty gets its topics again.
        # Short timeouts let the forwarder notice an outage quickly and back off; requests
        # never wait on it.
        ensure_topics(cfg.kafka, timeout_s=5)
        return producer(
            cfg.kafka.bootstrap,
            max_block_ms=5000,
            request_timeout_ms=5000,
            delivery_timeout_ms=10000,
            max_request_size=cfg.kafka.max_message_bytes,
            **(EmbeddedBroker.PRODUCER_OPTIONS if embedded else {}),
        )

    try:
        return Outbox(
            cfg.serving.outbox_dir,
            cfg.kafka.interactions_topic,
            connect,
            feedback_topic=cfg.kafka.feedback_topic,
            commit_delay_ms=cfg.serving.outbox_commit_delay_ms,
            segment_bytes=cfg.serving.outbox_segment_bytes,
            max_message_bytes=cfg.kafka.max_message_bytes,
            max_queued_records=cfg.serving.outbox_max_queued_records,
            retain=retain,
        )
    except DirectoryInUse as exc:
        _refuse(exc)


def _run_server(cfg: DynalignConfig, outbox=None, processes=None) -> None:
    import uvicorn

    from serving.server import InsecureConfig, check_exposure, create_app
    from shared.engine import EngineArgsError, parse_vllm_args, vllm_cli_args

    try:  # before anything starts
        check_exposure(cfg)
        parse_vllm_args(vllm_cli_args(cfg.model, cfg.serving))
    except (InsecureConfig, EngineArgsError) as exc:
        _refuse(exc)
    server_app = create_app(cfg, outbox or _outbox(cfg), processes)
    server = uvicorn.Server(
        uvicorn.Config(
            server_app,
            host=cfg.serving.host,
            port=cfg.serving.port,
            log_level="info",
            timeout_graceful_shutdown=10,
        )
    )
    server_app.state.server = server  # vLLM's engine-error handler stops it if the engine died
    server.run()


@app.command()
def serve(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    kafka: KafkaOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    engine_arg: EngineArgOpt = None,
    insecure_no_auth: InsecureOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Serve the OpenAI-compatible chat endpoint; log interactions to Kafka."""
    cfg = _config(config, model, kafka, host, port, engine_arg, insecure_no_auth, data_dir)
    if not cfg.kafka.bootstrap:
        raise typer.BadParameter(
            "serve needs --kafka (or DYNALIGN_KAFKA__BOOTSTRAP); "
            "`dynalign up` starts an embedded broker",
            param_hint="--kafka",
        )
    _run_server(cfg)


def _kept_secret(cfg: DynalignConfig, name: str):
    """`dynalign up` needs no set-up: a secret it needs is generated once and kept (0600) in the
    data directory, so it stays the same across restarts (the users' pseudonyms' salt, the
    learner's operator token)."""
    import secrets

    from pydantic import SecretStr

    path = cfg.data_dir / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return SecretStr(path.read_text().strip())


def _spawn_learner(
    cfg: DynalignConfig, config: Path | None, engine_args: list[str] | None
) -> subprocess.Popen:
    """The learner runs as its own process (the trainer, its own metrics port) beside the
    server, and rolls out on the server's engine."""
    import sys

    cmd = [
        sys.executable,
        "-m",
        "dynalign",
        "learn",
        "--kafka",
        cfg.kafka.bootstrap,
        "--single-user",
        "--data-dir",
        str(cfg.data_dir),
    ]
    if cfg.model.path:
        cmd += ["--model", cfg.model.path]
    if config:
        cmd += ["--config", str(config)]
    for pair in engine_args or []:
        cmd += ["--engine-arg", pair]
    host = cfg.serving.host if cfg.serving.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    env = {
        **os.environ,
        "DYNALIGN_LEARNER__ROLLOUT_ENDPOINTS": json.dumps([f"http://{host}:{cfg.serving.port}"]),
        "DYNALIGN_LEARNER__ROLLOUT_TOKEN": cfg.serving.operator_tokens[
            "learner"
        ].get_secret_value(),
    }
    return subprocess.Popen(cmd, env=env, preexec_fn=_learner_beside_users)


# `up`'s learner shares the machine with the server it rolls out on, users first: on 2 cores a
# user chatting back to back saw p50 1.64-1.69 s beside the update at niceness 19 (1.54 s
# alone), 11.3 s at 0; the update then waits for gaps between users' requests, and runs at full
# speed in them (bench/results/users_first.json).
UP_LEARNER_NICENESS = 19
# 384 MiB holds SmolLM2's whole context (8192 tokens need 360 MiB) and is what `up`'s users and
# learner use at once (~16 sequences of <= 450 tokens); 512 kept 0.13 GiB more in the engine
# core (bench/results/users_first_engine-512.json).
UP_KV_CACHE_BYTES = 384 * 2**20


def _learner_beside_users() -> None:
    die_with_parent()
    os.nice(UP_LEARNER_NICENESS)


@app.command()
def up(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    kafka: KafkaOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    engine_arg: EngineArgOpt = None,
    insecure_no_auth: InsecureOpt = False,
    data_dir: DataDirOpt = None,
    ephemeral: Annotated[
        bool,
        typer.Option(
            "--ephemeral",
            help="The embedded broker's log lives in memory only: a restart starts it empty.",
        ),
    ] = False,
) -> None:
    """Everything on one machine: a Kafka-protocol broker (embedded Tansu unless --kafka),
    the chat server on the model (default SmolLM2-135M-Instruct), the learner, metrics.

    The embedded broker keeps its log in memory; unless --ephemeral, the server's outbox
    retains every record it forwarded and gives them back to the broker at start, at the same
    offsets, before the learner starts: a restart keeps the interaction log."""
    from serving.server import InsecureConfig, check_exposure
    from shared.engine import has_gpu
    from shared.kafka import EmbeddedBroker

    cfg = _config(config, model, kafka, host, port, engine_arg, insecure_no_auth, data_dir)
    if ephemeral and cfg.kafka.bootstrap:
        raise typer.BadParameter(
            "the embedded broker's option; with --kafka the cluster keeps the log",
            param_hint="--ephemeral",
        )
    if Path("runs/adapters").is_dir() and not cfg.registry.store.exists():
        console.print(
            f"[yellow]./runs/ holds state of an older dynalign; state now lives in "
            f"{cfg.data_dir} (move runs/adapters, runs/learner and runs/outbox there to keep "
            "it)[/yellow]"
        )
    if cfg.serving.user_hash_salt is None:
        cfg.serving.user_hash_salt = _kept_secret(cfg, "user_hash_salt")
    if not has_gpu():
        # One machine's demo: UP_KV_CACHE_BYTES, not the CPU default's 1 GiB.
        cfg.model.engine_args.setdefault("kv_cache_memory_bytes", UP_KV_CACHE_BYTES)
    # The learner rolls out on this server, through the operator-only rollout routes.
    cfg.serving.operator_tokens.setdefault("learner", _kept_secret(cfg, "learner_token"))
    try:
        check_exposure(cfg)  # before the broker and the learner start
    except InsecureConfig as exc:
        _refuse(exc)
    with ending_descendants() as (cleanups, _):  # uvicorn stops on the signals itself
        embedded = not cfg.kafka.bootstrap
        if embedded:
            broker = EmbeddedBroker().start()
            cleanups.callback(broker.stop)
            cfg.kafka.bootstrap = broker.bootstrap
        outbox = _outbox(cfg, retain=embedded and not ephemeral, embedded=embedded)
        broker_note = ""
        if embedded and ephemeral:
            broker_note = " (embedded Tansu, in-memory)"
        elif embedded:
            reseeded = outbox.reseed()  # before the learner reads a partial log
            broker_note = (
                f" (embedded Tansu; its log kept by the outbox: {reseeded.records} records "
                f"back in {reseeded.seconds:.1f} s"
                + (
                    ", [red]offsets differ: see the log[/red])"
                    if reseeded.offsets_match is False
                    else ")"
                )
            )
        base = f"http://{cfg.serving.host}:{cfg.serving.port}"
        console.print(
            f"[bold]dynalign up[/bold]\n"
            f"  kafka      {cfg.kafka.bootstrap}{broker_note}"
            + f"\n  data       {cfg.data_dir}"
            + f"\n  chat       {base}/v1/chat/completions  model='{cfg.model.served_name}'"
            f"\n  models     {base}/v1/models\n  metrics    {base}/metrics (server), "
            f"http://127.0.0.1:{cfg.learner.metrics_port}/metrics (learner)"
            f"\n  outbox     {cfg.serving.outbox_dir.resolve()}",
            soft_wrap=True,
        )
        # Stopped before the broker: cleanups run last-registered first.
        supervisor = Supervisor()
        cleanups.callback(supervisor.stop)
        supervisor.add("learner", lambda: _spawn_learner(cfg, config, engine_arg))
        _run_server(cfg, outbox, supervisor.details)


def learner_settings(cfg: DynalignConfig, single_user: bool = False) -> DynalignConfig:
    """The profile's settings on a GPU; CPU-sized ones (unless set explicitly) without one.
    Prints them beside the paper's so nobody mistakes a run for the paper's configuration."""
    from rich.table import Table

    from shared.config import LearnerConfig
    from shared.engine import has_gpu

    paper = LearnerConfig(profile="paper")
    chosen = cfg.learner if has_gpu() else cfg.learner.cpu_sized()
    if not has_gpu():
        cfg.gate = cfg.gate.cpu_sized()
    if single_user and "on_inconclusive" not in cfg.gate.model_fields_set:
        cfg.gate = cfg.gate.model_copy(update={"on_inconclusive": "promote"})
        console.print(
            "[yellow]demo: a candidate the gate cannot judge is promoted "
            "(gate.on_inconclusive=promote); a deployment holds it for an operator[/yellow]"
        )
    if single_user and "max_user_share" not in cfg.learner.model_fields_set:
        chosen = chosen.model_copy(update={"max_user_share": 1.0})
        console.print(
            "[yellow]single-user demo: max_user_share is off (1.0); a deployment "
            "keeps it at 0.25 so no one user can steer the model[/yellow]"
        )
    table = Table(title="learner settings" + ("" if has_gpu() else " (no GPU: CPU-sized)"))
    for column in ("setting", "paper (Section 3.1)", "this run"):
        table.add_column(column)
    for name in LearnerConfig.model_fields:
        a, b = getattr(paper, name), getattr(chosen, name)
        table.add_row(name, str(a), str(b) if a == b else f"[bold]{b}[/bold]")
    console.print(table)
    cfg.learner = chosen
    return cfg


def _replay_bounds(text: str):
    from shared.kafka import parse_bound

    start, dots, end = text.partition("..")
    try:
        if not dots:
            raise ValueError("FROM..TO expected")
        return (parse_bound(start) if start else None, parse_bound(end) if end else None)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r}: {exc}; e.g. 120..480 or 2026-12-01T09:00..2026-12-01T18:00",
            param_hint="--replay",
        ) from None


@app.command()
def learn(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    kafka: KafkaOpt = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="Bootstrap from a static JSONL prompt set instead of Kafka."
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Stop after this many steps (total, across restarts)."),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Checkpoints and scratch (default: DATA_DIR/learner).")
    ] = None,
    reward_mode: Annotated[str | None, typer.Option(help="greedy | expected")] = None,
    engine_arg: EngineArgOpt = None,
    replay: Annotated[
        str | None,
        typer.Option(
            "--replay",
            help="FROM..TO: train on a past range of the log (offsets or ISO times; either "
            "side may be empty), in its own consumer group and workdir, then stop.",
        ),
    ] = None,
    single_user: Annotated[bool, typer.Option(hidden=True)] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Consume interactions, self-score G rollouts per prompt, GRPO-update the LoRA adapter,
    and publish a candidate adapter version every K steps."""
    from shared.engine import use_learner_threads

    use_learner_threads()  # before anything imports torch
    span_bounds = _replay_bounds(replay) if replay else None
    cfg = config_or_exit(
        config,
        data_dir,
        model={"path": model},
        kafka={"bootstrap": kafka},
        learner={"reward_mode": reward_mode},
    )  # before the slow imports
    from prometheus_client import start_http_server

    from learner.consumer import FilePromptSource, KafkaPromptSource
    from learner.loop import Learner
    from shared.files import DirectoryInUse

    cfg.model.engine_args = {**cfg.model.engine_args, **_engine_args(engine_arg)}
    cfg = learner_settings(cfg, single_user)
    if prompts is None and not cfg.kafka.bootstrap:
        raise typer.BadParameter("learn needs --kafka or --prompts", param_hint="--kafka")
    if replay:
        if prompts is not None:
            raise typer.BadParameter(
                "--replay reads the log, --prompts a file", param_hint="--replay"
            )
        # Its own group and checkpoints: the live learner's offsets and workdir stay untouched.
        cfg.learner.consumer_group += "-replay"
        if workdir is None:
            workdir = cfg.data_dir / ("replay-" + re.sub(r"[^\w.-]+", "_", replay))
    workdir = workdir or cfg.learner_workdir
    lc = cfg.learner
    start_http_server(lc.metrics_port)

    def source(prompt_filter, offsets, deferred):
        if prompts is not None:
            return FilePromptSource(prompts, prompt_filter, offsets)
        from shared.kafka import ensure_topics, range_offsets

        ensure_topics(cfg.kafka)
        span = None
        if span_bounds:
            topic = cfg.kafka.interactions_topic
            begin, stop = range_offsets(cfg.kafka.bootstrap, topic, *span_bounds)
            span = tuple(
                {f"{tp.topic}:{tp.partition}": o for tp, o in d.items()} for d in (begin, stop)
            )
            console.print(f"replaying {topic} offsets {span[0]} .. {span[1]} (end exclusive)")
        return KafkaPromptSource(cfg, prompt_filter, offsets, deferred, span=span)

    def progress(r) -> None:
        version = f"  → candidate v{r.candidate_version}" if r.candidate_version else ""
        console.print(
            f"step {r.step:>5}  reward {r.reward_mean:.2f}±{r.reward_std:.2f}  "
            f"zero-var {r.zero_variance_groups:.0%}  unparsable {r.unparsable}  kl {r.kl:.4f}  "
            f"loss {r.loss:+.4f}  len {r.completion_tokens:.0f}  {r.tokens_per_s:.0f} tok/s  "
            + " ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
            + version,
            soft_wrap=True,
        )

    with ending_descendants() as (cleanups, stopping):
        learner = Learner(cfg, workdir, source)
        cleanups.callback(learner.close)  # also after a setup that fails part way
        try:
            learner.setup()
        except DirectoryInUse as exc:
            _refuse(exc)
        console.print(
            f"learner: metrics on :{lc.metrics_port}/metrics, checkpoints in "
            f"{workdir}, candidates in {cfg.registry.store}"
        )
        if prompts is None and not replay:  # users' signal per version, from the live log
            from learner.signals import SignalJob
            from shared.lifecycle import Lifecycle

            job = SignalJob(cfg.kafka, lifecycle=Lifecycle.from_config(cfg))
            cleanups.callback(job.start().close)
        learner.run(max_steps=max_steps, on_step=progress, stop=stopping)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app()


if __name__ == "__main__":
    main()
