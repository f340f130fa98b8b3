"""Observability as deployed: the Grafana dashboards and Prometheus alert rules in deploy/,
checked for structure, then evaluated by a real Prometheus scraping a real server and learner;
the drift alerts fired by a real Prometheus. The compose and Kubernetes manifests are checked in
tests/test_deploy.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from shared.config import LearnerConfig, ServingConfig
from shared.kafka import free_port
from tests.conftest import API_KEY, REPO

DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SERVER_JOB, LEARNER_JOB = "dynalign-server", "dynalign-learner"
# Grafana's own variables, as Prometheus would see them for a short test window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}


# -- the expressions in deploy/ -------------------------------------------------------------------
def dashboard_expressions() -> dict[str, str]:
    found = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                found[f"{path.name}: {panel['title']} [{target['refId']}]"] = target["expr"]
        for annotation in board["annotations"]["list"]:
            found[f"{path.name}: annotation {annotation['name']}"] = annotation["expr"]
    return found


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def all_expressions() -> dict[str, str]:
    return {
        **dashboard_expressions(),
        **{f"alerts.yml: {rule['alert']}": rule["expr"] for rule in alert_rules()},
    }


def evaluable(expr: str) -> str:
    """The expression as the test asks Prometheus for it: Grafana variables filled in, and
    every comparison made a `bool` one. A comparison filters out the series that do not pass
    it (an alert that does not fire returns nothing); with `bool` it returns 0 or 1 for every
    series, so an empty answer means a metric without samples (or labels that never match)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    out, i, nesting, quote = [], 0, 0, None
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = None if char == quote and expr[i - 1] != "\\" else quote
        elif char in "\"'`":
            quote = char
        elif char in "{[":
            nesting += 1
        elif char in "}]":
            nesting -= 1
        elif nesting == 0 and (op := re.match(r"==|!=|>=|<=|>|<", expr[i:])):
            out.append(op.group())
            i += len(op.group())
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        out.append(char)
        i += 1
    return "".join(out)


def code_metrics() -> list:
    """The metrics the server's and the learner's metrics modules define."""
    from prometheus_client.metrics import MetricWrapperBase

    import learner.metrics
    import serving.metrics

    return [
        value
        for module in (serving.metrics, learner.metrics)
        for value in vars(module).values()
        if isinstance(value, MetricWrapperBase)
    ]


def exported_metric_names() -> set[str]:
    """Every sample name those metrics can expose."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {metric._name + suffix for metric in code_metrics() for suffix in suffixes[metric._type]}


def test_evaluable_adds_bool_to_comparisons_outside_selectors():
    assert evaluable('up{job!="x"} == 0') == 'up{job!="x"} == bool 0'
    assert evaluable("a > 0 and b >= bool 1") == "a > bool 0 and b >= bool 1"
    assert (
        evaluable("x < on() group_left() (max(x) - 0.05)")
        == "x < bool on() group_left() (max(x) - 0.05)"
    )
    assert evaluable("rate(x[$__rate_interval])") == "rate(x[1m])"


def test_every_metric_in_dashboards_and_rules_is_exported_by_the_code():
    exported = exported_metric_names()
    for source, expr in all_expressions().items():
        for name in re.findall(r"\b(dynalign_[a-z0-9_]+)", expr):
            assert name in exported, f"{source}: {name} is not exported by the code"


def test_metric_names_follow_prometheus_conventions():
    for metric in code_metrics():
        name = metric._name  # prometheus_client keeps counters' names without `_total`
        assert re.fullmatch(r"dynalign_[a-z0-9_]+", name), name
        if metric._type == "gauge":
            assert not name.endswith("_total"), f"gauge {name} reads as a counter"
        if "latency" in name or "time" in name:
            assert metric._type == "histogram" and name.endswith("_seconds"), name


# -- dashboards -----------------------------------------------------------------------------------
def provisioned_datasources() -> dict[str, str]:
    provisioning = DEPLOY / "grafana" / "provisioning" / "datasources"
    return {
        source["uid"]: source["type"]
        for path in provisioning.glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    }


def test_dashboards_are_well_formed():
    datasources = provisioned_datasources()
    assert {path.stem for path in DASHBOARDS} == {"serving", "learner", "drift"}
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)

    def resolves(reference: dict, where: str) -> None:
        assert datasources.get(reference["uid"]) == reference["type"], (
            f"{where}: datasource {reference} is not provisioned ({datasources})"
        )

    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            where = f"{path.name}: {panel['title']}"
            assert panel["targets"], f"{where}: no query"
            resolves(panel["datasource"], where)
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{where}: empty query"
                resolves(target["datasource"], where)
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
        for annotation in board["annotations"]["list"]:
            resolves(annotation["datasource"], f"{path.name}: annotation {annotation['name']}")
        variables = {v["name"] for v in board["templating"]["list"]}
        queries = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
        for expr in queries + [a["expr"] for a in board["annotations"]["list"]]:
            for variable in re.findall(r"\$\{?(\w+)", expr):
                assert f"${variable}" in GRAFANA_VARIABLES or variable in variables, (
                    f"{path.name}: ${variable} in {expr!r} is not defined"
                )
    drift = json.loads((DEPLOY / "grafana" / "dashboards" / "drift.json").read_text())
    assert drift["annotations"]["list"], "the drift dashboard marks version changes"


def test_alert_rules_and_scrape_config_pass_promtool():
    assert shutil.which("promtool"), "promtool not found: install the Debian package prometheus"
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(SCRAPE_CONFIG)]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    names = [rule["alert"] for rule in alert_rules()]
    for needed in (
        "DynalignRewardSaturation",
        "DynalignRewardDrift",
        "DynalignCompletionLengthDrift",
        "DynalignProbeKLAboveBound",
        "DynalignTrainingKLAboveBound",
        "DynalignIFEvalCanaryDrop",
        "DynalignConsumerLagGrowing",
        "DynalignOutboxGrowing",
        "DynalignAdapterSwapFailures",
        "DynalignLearnerStalled",
    ):
        assert needed in names


# -- deploy manifests -----------------------------------------------------------------------------
def scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


def test_scrape_targets_are_the_default_ports():
    targets = scrape_targets()
    assert targets[SERVER_JOB] == [f"server:{ServingConfig().port}"] == ["server:8000"]
    assert targets[LEARNER_JOB] == [f"learner:{LearnerConfig().metrics_port}"] == ["learner:9401"]
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert all(job["metrics_path"] == "/metrics" for job in config["scrape_configs"])


# -- a real Prometheus ----------------------------------------------------------------------------
class Prometheus:
    """A Prometheus process whose config is deploy/'s, with the test's targets, 1 s scrape and
    evaluation intervals, and the given rule file."""

    def __init__(self, workdir: Path, targets: dict[str, str], rules: Path) -> None:
        assert shutil.which("prometheus"), (
            "prometheus not found: install the Debian package prometheus"
        )
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(rules)]
        config["scrape_configs"] = [
            {**job, "static_configs": [{"targets": [targets[job["job_name"]]]}]}
            for job in config["scrape_configs"]
            if job["job_name"] in targets
        ]
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self._ready(), 60, "Prometheus ready", self.log_path)

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def alerts(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]

    def targets(self) -> list[dict]:
        """Each scrape target's health and last error, for a test's failure message."""
        active = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return [{k: t[k] for k in ("scrapeUrl", "health", "lastError")} for t in active]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_for(condition, timeout_s: float, what: str, log: Path | None = None, diagnosis=None):
    """Poll `condition` until it returns something truthy; fail naming `what` at the deadline,
    with `diagnosis()` (what the test saw) and the tail of `log`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            seen = diagnosis() if diagnosis else ""
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n{seen}\n{tail}")
        time.sleep(0.5)  # the pace of polling an HTTP API, not a synchronisation


def metrics_up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# The learner, as `python -m dynalign learn`, after setting what only later code will measure.
LEARNER = """
import sys
from learner import drift
# Windows a few CPU steps fill (the defaults want 256 rollouts).
drift.MONITOR = drift.DriftMonitor(reference_size=32, window_size=32, min_observations=16)
# Measured by the gate, switched off here to keep the test short: its exported series, with
# made-up values.
drift.record_gate_result(1, score_diff=0.1, probe_kl=0.05, ifeval_accuracy=0.7)
drift.record_gate_result(2, score_diff=-0.2, probe_kl=0.08, ifeval_accuracy=0.6)
from dynalign.cli import main
sys.argv = ["dynalign", "learn", *sys.argv[1:]]
main()
"""


def start_learner(workdir: Path, tiny_model: Path, bootstrap: str, port: int):
    env = {
        **os.environ,
        "DYNALIGN_LEARNER__METRICS_PORT": str(port),
        "DYNALIGN_LEARNER__BATCH_COMPLETIONS": "16",
        "DYNALIGN_LEARNER__MAX_NEW_TOKENS": "8",
        "DYNALIGN_LEARNER__CONSUMER_GROUP": f"observability-{uuid.uuid4().hex[:6]}",
        "DYNALIGN_LEARNER__MAX_USER_SHARE": "1.0",  # one API key: one principal chats here
        "DYNALIGN_REGISTRY__STORE": str(workdir / "adapters"),
        "DYNALIGN_MODEL__MAX_MODEL_LEN": "1024",
        "DYNALIGN_GATE__ENABLED": "false",
    }
    log_path = workdir / "learner.log"
    with log_path.open("wb") as log:
        # Its own process group, so the vLLM engine it starts goes down with it.
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LEARNER,
                "--kafka",
                bootstrap,
                "--model",
                str(tiny_model),
                "--workdir",
                str(workdir / "learner"),
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    process.wait()


def traffic(server) -> None:
    """Chats that reach every server-side series the dashboards read, and give the learner
    prompts (one API key, one principal: the learner runs with the share cap off)."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    tag = uuid.uuid4().hex[:6]
    ask = {"model": "dynalign", "max_tokens": 8, "temperature": 1.0}
    prompts = [f"Plan community event {i} ({tag})" for i in range(12)]
    for i, text in enumerate(prompts):
        client.chat.completions.create(
            messages=[{"role": "user", "content": text}], user=f"{tag}-user-{i}", **ask
        )
    # The same prompt again: the learner skips it as a duplicate.
    client.chat.completions.create(
        messages=[{"role": "user", "content": prompts[0]}], user=f"{tag}-user-dup", **ask
    )
    # ... and by its user, who asks for another answer (a regenerated one) and rates it.
    again = client.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": prompts[1]}], user=f"{tag}-user-1", **ask
    )
    client.post(
        "/feedback",
        body={"interaction_id": again.headers["x-dynalign-interaction-id"], "rating": "down"},
        cast_to=object,
    )
    list(
        client.chat.completions.create(  # a stream: time to first token
            messages=[{"role": "user", "content": f"Stream a plan ({tag})"}],
            stream=True,
            user=f"{tag}-user-stream",
            **ask,
        )
    )
    client.chat.completions.create(
        messages=[{"role": "user", "content": "private"}],
        extra_headers={"X-Dynalign-No-Train": "1"},
        **ask,
    )
    with pytest.raises(NotFoundError):
        client.chat.completions.create(
            messages=[{"role": "user", "content": "x"}], **{**ask, "model": "no-such-model"}
        )


def refused_swap(server, tiny_model: Path) -> None:
    """Promote a version trained on another base in the server's registry: the server refuses
    it (a swap failure); then roll the registry back so the server serves as before."""
    from shared.lifecycle import Lifecycle
    from shared.registry import Registry
    from tests.synthetic import publish_random

    store = server.data_dir / "adapters"  # the default, in the server's data directory
    registry = Registry(store)
    before = registry.read_state().live
    version = publish_random(registry, tiny_model, seed=5, fingerprint="0" * 64).version
    Lifecycle(registry).promote(
        version, actor="test_observability", reason="a swap the server refuses"
    )
    try:
        wait_for(
            lambda: (
                "dynalign_adapter_swap_failures_total{"
                in httpx.get(f"{server.base_url}/metrics").text
            ),
            60,
            "the refused swap",
            server.log_path,
        )
    finally:
        Lifecycle(registry).rollback(actor="test_observability", to=before, reason="restore")


@pytest.mark.slow
def test_every_dashboard_and_alert_expression_returns_data(server, broker, tiny_model, tmp_path):
    """Prometheus scrapes a running server and learner; every expression of the dashboards and
    the alert rules must return data, so none reads a metric the code does not export."""
    learner_port = free_port()
    learner, learner_log = start_learner(tmp_path, tiny_model, broker.bootstrap, learner_port)
    prometheus = None
    try:
        traffic(server)
        refused_swap(server, tiny_model)
        prometheus = Prometheus(
            tmp_path / "prometheus",
            {
                SERVER_JOB: server.base_url.removeprefix("http://"),
                LEARNER_JOB: f"127.0.0.1:{learner_port}",
            },
            ALERTS,
        )
        pending = all_expressions()

        def all_answered() -> bool:
            assert learner.poll() is None, learner_log.read_text()[-4000:]
            for source, expr in list(pending.items()):
                if prometheus.query(evaluable(expr)):
                    del pending[source]
            return not pending

        deadline = time.monotonic() + 420
        while not all_answered() and time.monotonic() < deadline:
            time.sleep(1)  # Prometheus scrapes every second; the learner steps every few
        assert not pending, (
            "no data for:\n"
            + "\n".join(f"  {s}: {e}" for s, e in pending.items())
            + "\nlearner log:\n"
            + learner_log.read_text()[-3000:]
        )
        up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
        assert up == {SERVER_JOB: "1", LEARNER_JOB: "1"}
    finally:
        if prometheus:
            prometheus.stop()
        stop_group(learner)


# The drift scenario: a reference, then one version per case, exported like the learner does.
DRIFT_SCENARIO = """
import json, math, sys, threading
import numpy as np
from prometheus_client import start_http_server
from learner.drift import DriftMonitor

rng = np.random.default_rng(0)
monitor = DriftMonitor()
signals = {}
for version, reward_mean, length_median in ((None, 2.5, 100), (1, 2.5, 100), (2, 3.7, 100),
                                            (3, 2.5, 160)):
    for _ in range(8):  # 8 steps of 32 rollouts fill a 256-rollout window
        rewards = np.clip(rng.normal(reward_mean, 0.9, 32), 0, 5)
        lengths = np.round(rng.lognormal(math.log(length_median), 0.4, 32)).astype(int)
        step = monitor.observe_step(rewards.tolist(), lengths.tolist(), 0.2, version)
    signals[str(version)] = step.__dict__
start_http_server(int(sys.argv[1]), addr="127.0.0.1")
print(json.dumps(signals), flush=True)
threading.Event().wait()
"""


@pytest.mark.slow
def test_drift_alerts_fire_in_prometheus_for_shifted_distributions_only(tmp_path):
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)  # fire on the first evaluation, not after 15 minutes
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    threshold = {
        rule["alert"]: float(rule["expr"].split(">")[1])
        for rule in alert_rules()
        if rule["alert"] in ("DynalignRewardDrift", "DynalignCompletionLengthDrift")
    }

    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-c", DRIFT_SCENARIO, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    prometheus = None
    try:
        signals = json.loads(exporter.stdout.readline())
        # Unshifted: under both thresholds; shifted rewards or lengths: over theirs.
        assert signals["1"]["reward_psi"] < threshold["DynalignRewardDrift"]
        assert signals["1"]["length_psi"] < threshold["DynalignCompletionLengthDrift"]
        assert signals["2"]["reward_psi"] > threshold["DynalignRewardDrift"]
        assert signals["3"]["length_psi"] > threshold["DynalignCompletionLengthDrift"]

        prometheus = Prometheus(
            tmp_path / "prometheus", {LEARNER_JOB: f"127.0.0.1:{port}"}, tmp_path / "alerts.yml"
        )

        def drift_alerts() -> dict[str, set[str]]:
            firing: dict[str, set[str]] = {}
            for alert in prometheus.alerts():
                if alert["labels"]["alertname"] in threshold:
                    assert alert["state"] == "firing", alert
                    firing.setdefault(alert["labels"]["alertname"], set()).add(
                        alert["labels"]["adapter_version"]
                    )
            return firing

        def both_firing() -> dict[str, set[str]] | None:
            firing = drift_alerts()
            return firing if len(firing) == 2 else None

        firing = wait_for(both_firing, 60, "the drift alerts", prometheus.log_path)
        assert firing == {"DynalignRewardDrift": {"2"}, "DynalignCompletionLengthDrift": {"3"}}
    finally:
        if prometheus:
            prometheus.stop()
        exporter.kill()
        exporter.wait()
