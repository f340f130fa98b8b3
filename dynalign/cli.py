"""`dynalign` — one entry point for every process of the loop.

    dynalign up      broker (embedded unless --kafka) + server + learner on one machine
    dynalign serve   the OpenAI-compatible chat server
    dynalign learn   the self-rewarding GRPO learner
    dynalign datagen the paper's task-prompt generation
    dynalign eval    pairwise CA judgement | IFEval
    dynalign adapters list | show | diff | promote | rollback | pin | unpin | pause-learning | resume-learning
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dynalign.adapters_cli import adapters_app
from learner.datagen import datagen_command
from learner.evaluate import eval_app
from shared.config import DynalignConfig, load_config

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


def _config(config: Path | None, model: str | None, kafka: str | None, host: str | None,
            port: int | None) -> DynalignConfig:
    return load_config(config, model={"path": model}, kafka={"bootstrap": kafka},
                       serving={"host": host, "port": port})


def _run_server(cfg: DynalignConfig) -> None:
    import uvicorn

    from serving.outbox import Outbox
    from serving.server import create_app
    from shared.kafka import ensure_topics, producer

    def connect():
        # Called on every (re)connect: a broker that came back empty gets its topics again.
        # Short timeouts let the forwarder notice an outage quickly and back off; requests
        # never wait on it.
        ensure_topics(cfg.kafka, timeout_s=5)
        return producer(cfg.kafka.bootstrap, max_block_ms=5000, request_timeout_ms=5000,
                        delivery_timeout_ms=10000, max_request_size=cfg.kafka.max_message_bytes)

    outbox = Outbox(
        cfg.serving.outbox_dir,
        cfg.kafka.interactions_topic,
        connect,
        fsync_interval_ms=cfg.serving.outbox_fsync_interval_ms,
        segment_bytes=cfg.serving.outbox_segment_bytes,
        max_message_bytes=cfg.kafka.max_message_bytes,
        max_queued_records=cfg.serving.outbox_max_queued_records,
    )
    uvicorn.run(create_app(cfg, outbox), host=cfg.serving.host, port=cfg.serving.port,
                log_level="info", timeout_graceful_shutdown=10)


@app.command()
def serve(config: ConfigOpt = None, model: ModelOpt = None, kafka: KafkaOpt = None,
          host: HostOpt = None, port: PortOpt = None) -> None:
    """Serve the OpenAI-compatible chat endpoint; log interactions to Kafka."""
    cfg = _config(config, model, kafka, host, port)
    if not cfg.kafka.bootstrap:
        raise typer.BadParameter("serve needs --kafka (or DYNALIGN_KAFKA__BOOTSTRAP); "
                                 "`dynalign up` starts an embedded broker", param_hint="--kafka")
    _run_server(cfg)


def _spawn_learner(cfg: DynalignConfig, config: Path | None):
    """The learner runs as its own process (own engine, own metrics port) beside the server."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dynalign", "learn", "--kafka", cfg.kafka.bootstrap,
           "--single-user"]
    if cfg.model.path:
        cmd += ["--model", cfg.model.path]
    if config:
        cmd += ["--config", str(config)]
    return subprocess.Popen(cmd)


@app.command()
def up(config: ConfigOpt = None, model: ModelOpt = None, kafka: KafkaOpt = None,
       host: HostOpt = None, port: PortOpt = None) -> None:
    """Everything on one machine: a Kafka-protocol broker (embedded Tansu unless --kafka),
    the chat server on the model (default SmolLM2-135M-Instruct), metrics."""
    from shared.kafka import EmbeddedBroker

    cfg = _config(config, model, kafka, host, port)
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
    learner = _spawn_learner(cfg, config)
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

    from serving.engine import has_gpu
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
    single_user: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Consume interactions, self-score G rollouts per prompt, GRPO-update the LoRA adapter,
    and publish a candidate adapter version every K steps."""
    from prometheus_client import start_http_server
    from transformers import AutoTokenizer

    from learner.consumer import FilePromptSource, KafkaPromptSource, PromptFilter
    from learner.grpo import prompt_ids
    from learner.loop import Learner
    from serving.engine import resolve_model_path

    cfg = load_config(config, model={"path": model}, kafka={"bootstrap": kafka},
                      learner={"reward_mode": reward_mode})
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
