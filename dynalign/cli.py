"""`dynalign` — one entry point for every process of the loop.

    dynalign up      broker (embedded unless --kafka) + server + learner on one machine
    dynalign serve   the OpenAI-compatible chat server
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from shared.config import DynalignConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
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
                        delivery_timeout_ms=10000)

    outbox = Outbox(
        cfg.serving.outbox_dir,
        cfg.kafka.interactions_topic,
        connect,
        fsync_interval_ms=cfg.serving.outbox_fsync_interval_ms,
        segment_bytes=cfg.serving.outbox_segment_bytes,
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
        f"\n  models     {base}/v1/models\n  metrics    {base}/metrics"
        f"\n  outbox     {cfg.serving.outbox_dir.resolve()}"
    )
    try:
        _run_server(cfg)
    finally:
        if broker:
            broker.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app()


if __name__ == "__main__":
    main()
