"""`dynalign` — one entry point for every process of the loop.

    dynalign up      broker (embedded unless --kafka) + server + learner on one machine
    dynalign serve   the OpenAI-compatible chat server
    dynalign learn   the self-rewarding GRPO learner
    dynalign datagen the paper's task-prompt generation
    dynalign eval    pairwise CA judgement | IFEval
    dynalign adapters list | show | diff | promote | rollback | pin | unpin | pause-learning | resume-learning
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dynalign.adapters_cli import adapters_app
from offline.datagen import datagen_command
from offline.evaluate import eval_app
from dynalign.settings import config_or_exit
from shared.config import DynalignConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command("datagen")(datagen_command)
app.add_typer(eval_app, name="eval", help="Pairwise CA judgement and IFEval.")
app.add_typer(adapters_app, name="adapters", help="List, promote, roll back, pin adapters.")
console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML or YAML config file.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Hub id or local path (default: SmolLM2-135M-Instruct from PyPI).")]
KafkaOpt = Annotated[Optional[str], typer.Option(
    "--kafka", help="Kafka bootstrap servers (host:port,...).")]
HostOpt = Annotated[Optional[str], typer.Option("--host")]
PortOpt = Annotated[Optional[int], typer.Option("--port")]
EngineArgOpt = Annotated[Optional[list[str]], typer.Option(
    "--engine-arg", help="Any `vllm serve` engine flag as KEY=VALUE (repeatable), e.g. "
    "max_num_seqs=64; checked by vLLM's own parser.")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure-no-auth", help="Serve a non-loopback address without API keys.")]


def _engine_args(pairs: list[str] | None) -> dict:
    """KEY=VALUE pairs; VALUE read as JSON when it is JSON (64, false, {"a": 1}), else text."""
    parsed = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}",
                                     param_hint="--engine-arg")
        try:
            parsed[key.strip()] = json.loads(value)
        except ValueError:
            parsed[key.strip()] = value
    return parsed


def _config(config: Path | None, model: str | None, kafka: str | None, host: str | None,
            port: int | None, engine_args: list[str] | None = None,
            insecure_no_auth: bool = False) -> DynalignConfig:
    cfg = config_or_exit(config, model={"path": model}, kafka={"bootstrap": kafka},
                      serving={"host": host, "port": port,
                               "insecure_no_auth": insecure_no_auth or None})
    cfg.model.engine_args = {**cfg.model.engine_args, **_engine_args(engine_args)}
    return cfg


def _refuse(exc: Exception) -> None:
    """A configuration the server must not run with: say why, exit non-zero."""
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _run_server(cfg: DynalignConfig) -> None:
    import uvicorn

    from shared.engine import EngineArgsError, parse_vllm_args, vllm_cli_args
    from serving.outbox import Outbox
    from serving.server import InsecureConfig, check_exposure, create_app
    from shared.kafka import ensure_topics, producer

    try:  # before anything starts
        check_exposure(cfg)
        parse_vllm_args(vllm_cli_args(cfg.model, cfg.serving))
    except (InsecureConfig, EngineArgsError) as exc:
        _refuse(exc)

    def connect():
        # Called on every (re)connect: a broker that came back empty gets its topics again.
        # Short timeouts let the forwarder notice an outage quickly and back off; requests
        # never wait on it.
        ensure_topics(cfg.kafka, timeout_s=5)
        return producer(cfg.kafka.bootstrap, max_block_ms=5000, request_timeout_ms=5000,
                        delivery_timeout_ms=10000)

    outbox = Outbox(
        cfg.serving.outbox_dir,
        cfg.kafka.interactions_topic,
        connect,
        fsync_interval_ms=cfg.serving.outbox_fsync_interval_ms,
        segment_bytes=cfg.serving.outbox_segment_bytes,
    )
    server_app = create_app(cfg, outbox)
    server = uvicorn.Server(uvicorn.Config(server_app, host=cfg.serving.host,
                                           port=cfg.serving.port, log_level="info",
                                           timeout_graceful_shutdown=10))
    server_app.state.server = server  # vLLM's engine-error handler stops it if the engine died
    server.run()


@app.command()
def serve(config: ConfigOpt = None, model: ModelOpt = None, kafka: KafkaOpt = None,
          host: HostOpt = None, port: PortOpt = None, engine_arg: EngineArgOpt = None,
          insecure_no_auth: InsecureOpt = False) -> None:
    """Serve the OpenAI-compatible chat endpoint; log interactions to Kafka."""
    cfg = _config(config, model, kafka, host, port, engine_arg, insecure_no_auth)
    if not cfg.kafka.bootstrap:
        raise typer.BadParameter("serve needs --kafka (or DYNALIGN_KAFKA__BOOTSTRAP); "
                                 "`dynalign up` starts an embedded broker", param_hint="--kafka")
    _run_server(cfg)


def _demo_salt(cfg: DynalignConfig) -> None:
    """`dynalign up` needs no set-up: a random salt is generated once and kept (0600) beside
    the server's outbox, so pseudonyms stay stable across restarts of the demo."""
    import secrets

    from pydantic import SecretStr

    if cfg.serving.user_hash_salt is not None:
        return
    path = cfg.serving.outbox_dir.parent / "user_hash_salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    cfg.serving.user_hash_salt = SecretStr(path.read_text().strip())


def _spawn_learner(cfg: DynalignConfig, config: Path | None, engine_args: list[str] | None):
    """The learner runs as its own process (own engine, own metrics port) beside the server."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dynalign", "learn", "--kafka", cfg.kafka.bootstrap,
           "--single-user"]
    if cfg.model.path:
        cmd += ["--model", cfg.model.path]
    if config:
        cmd += ["--config", str(config)]
    for pair in engine_args or []:
        cmd += ["--engine-arg", pair]
    return subprocess.Popen(cmd)


@app.command()
def up(config: ConfigOpt = None, model: ModelOpt = None, kafka: KafkaOpt = None,
       host: HostOpt = None, port: PortOpt = None, engine_arg: EngineArgOpt = None,
       insecure_no_auth: InsecureOpt = False) -> None:
    """Everything on one machine: a Kafka-protocol broker (embedded Tansu unless --kafka),
    the chat server on the model (default SmolLM2-135M-Instruct), metrics."""
    from serving.server import InsecureConfig, check_exposure
    from shared.kafka import EmbeddedBroker

    cfg = _config(config, model, kafka, host, port, engine_arg, insecure_no_auth)
    _demo_salt(cfg)
    try:
        check_exposure(cfg)  # before the broker and the learner start
    except InsecureConfig as exc:
        _refuse(exc)
    broker = None
    if not cfg.kafka.bootstrap:
        broker = EmbeddedBroker().start()
        cfg.kafka.bootstrap = broker.bootstrap
    base = f"http://{cfg.serving.host}:{cfg.serving.port}"
    console.print(
        f"[bold]dynalign up[/bold]\n"
        f"  kafka      {cfg.kafka.bootstrap}" + (" (embedded Tansu, in-memory)" if broker else "")
        + f"\n  chat       {base}/v1/chat/completions  model='{cfg.model.served_name}'"
        f"\n  models     {base}/v1/models\n  metrics    {base}/metrics (server), "
        f"http://127.0.0.1:{cfg.learner.metrics_port}/metrics (learner)"
        f"\n  outbox     {cfg.serving.outbox_dir.resolve()}"
    )
    learner = _spawn_learner(cfg, config, engine_arg)
    try:
        _run_server(cfg)
    finally:
        learner.terminate()
        learner.wait(timeout=30)
        if broker:
            broker.stop()


def learner_settings(cfg: DynalignConfig, single_user: bool = False) -> DynalignConfig:
    """The paper's settings on a GPU; CPU-sized ones (unless set explicitly) without one.
    Prints both sets so nobody mistakes a CPU demo for the paper's configuration."""
    from rich.table import Table

    from shared.engine import has_gpu
    from shared.config import LearnerConfig

    paper = LearnerConfig()
    chosen = cfg.learner if has_gpu() else cfg.learner.cpu_sized()
    if not has_gpu():
        cfg.gate = cfg.gate.cpu_sized()
    if single_user and "max_user_share" not in cfg.learner.model_fields_set:
        chosen = chosen.model_copy(update={"max_user_share": 1.0})
        console.print("[yellow]single-user demo: max_user_share is off (1.0); a deployment "
                      "keeps it at 0.25 so no one user can steer the model[/yellow]")
    table = Table(title="learner settings" + ("" if has_gpu() else " (no GPU: CPU-sized)"))
    for column in ("setting", "paper (GPU default)", "this run"):
        table.add_column(column)
    for name in LearnerConfig.model_fields:
        a, b = getattr(paper, name), getattr(chosen, name)
        table.add_row(name, str(a), str(b) if a == b else f"[bold]{b}[/bold]")
    console.print(table)
    cfg.learner = chosen
    return cfg


@app.command()
def learn(
    config: ConfigOpt = None, model: ModelOpt = None, kafka: KafkaOpt = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Bootstrap from a static JSONL prompt set instead of Kafka.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", help="Stop after this many steps (total, across restarts).")] = None,
    workdir: Annotated[Path, typer.Option(help="Checkpoints and scratch.")] = Path("runs/learner"),
    reward_mode: Annotated[Optional[str], typer.Option(help="greedy | expected")] = None,
    engine_arg: EngineArgOpt = None,
    single_user: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Consume interactions, self-score G rollouts per prompt, GRPO-update the LoRA adapter,
    and publish a candidate adapter version every K steps."""
    from prometheus_client import start_http_server
    from transformers import AutoTokenizer

    from learner.consumer import FilePromptSource, KafkaPromptSource, PromptFilter
    from learner.grpo import prompt_ids
    from learner.loop import Learner
    from shared.engine import resolve_model_path

    cfg = config_or_exit(config, model={"path": model}, kafka={"bootstrap": kafka},
                      learner={"reward_mode": reward_mode})
    cfg.model.engine_args = {**cfg.model.engine_args, **_engine_args(engine_arg)}
    cfg = learner_settings(cfg, single_user)
    if prompts is None and not cfg.kafka.bootstrap:
        raise typer.BadParameter("learn needs --kafka or --prompts", param_hint="--kafka")
    lc = cfg.learner
    start_http_server(lc.metrics_port)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    prompt_filter = PromptFilter(lambda messages: len(prompt_ids(tokenizer, messages)),
                                 lc.max_prompt_tokens, lc.dedupe_window, lc.max_user_share)

    def source(offsets):
        if prompts is not None:
            return FilePromptSource(prompts, offsets)
        from shared.kafka import ensure_topics

        ensure_topics(cfg.kafka)
        return KafkaPromptSource(cfg, prompt_filter, offsets)

    learner = Learner(cfg, workdir, source)
    console.print(f"learner: metrics on :{lc.metrics_port}/metrics, checkpoints in {workdir}, "
                  f"candidates in {cfg.registry.store}")

    def progress(r) -> None:
        version = f"  → candidate v{r.candidate_version}" if r.candidate_version else ""
        console.print(
            f"step {r.step:>5}  reward {r.reward_mean:.2f}±{r.reward_std:.2f}  "
            f"zero-var {r.zero_variance_groups:.0%}  unparsable {r.unparsable}  kl {r.kl:.4f}  "
            f"loss {r.loss:+.4f}  len {r.completion_tokens:.0f}  {r.tokens_per_s:.0f} tok/s  "
            + " ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()) + version, soft_wrap=True)

    try:
        learner.run(max_steps=max_steps, on_step=progress)
    finally:
        learner.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app()


if __name__ == "__main__":
    main()
