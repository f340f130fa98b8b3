"""The deployment as written in deploy/: the Kubernetes manifests and the compose file parsed and
checked for what must not regress — durable per-replica outboxes, a grace period longer than the
server's drain, hardened and pinned containers, secrets only from Secrets and git-ignored env
files, replicated topics, a single learner, monitoring bound to loopback — and checked against
the config they feed. Parsing only: no engine, no container runtime."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from shared.config import DynalignConfig, LearnerConfig, ServingConfig
from tests.conftest import REPO
from tests.test_observability import SCRAPE_CONFIG, scrape_targets

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

# The server's shutdown after SIGTERM (dynalign/cli.py, serving/outbox.py): in-flight requests
# up to 10 s (uvicorn's graceful timeout), the outbox gives Kafka up to 10 s, the engine stops.
# Measured at <= 30 s; the grace period must be comfortably above it.
DRAIN_BUDGET_S = 30
# The server's secrets (the configuration contract), as env vars, Secret keys and env-file lines.
SECRET_VARS = {
    "DYNALIGN_SERVING__API_KEYS",
    "DYNALIGN_SERVING__OPERATOR_TOKENS",
    "DYNALIGN_SERVING__USER_HASH_SALT",
}
SECRET_NAME = "dynalign-secrets"
# Stand-ins for the secrets where a test builds the config a pod would see.
SECRET_STAND_INS = {
    "DYNALIGN_SERVING__API_KEYS": '["test-key"]',
    "DYNALIGN_SERVING__OPERATOR_TOKENS": '{"alice": "test-token"}',
    "DYNALIGN_SERVING__USER_HASH_SALT": "test-salt",
}
TOPIC_VARS = {"DYNALIGN_KAFKA__REPLICATION_FACTOR": "3", "DYNALIGN_KAFKA__MIN_INSYNC_REPLICAS": "2"}
SECRET_LIKE = re.compile(r"KEY|TOKEN|SALT|PASSWORD|SECRET")
DYNALIGN_WORKLOADS = {"dynalign-server": "serve", "dynalign-learner": "learn"}


# -- reading deploy/ ------------------------------------------------------------------------------
def kustomize_resources() -> list[str]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def k8s_documents() -> list[dict]:
    return [
        doc
        for name in kustomize_resources()
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def by_kind() -> dict[str, dict[str, dict]]:
    found: dict[str, dict[str, dict]] = {}
    for doc in k8s_documents():
        found.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return found


def workloads() -> dict[str, dict]:
    kinds = by_kind()
    return {**kinds.get("StatefulSet", {}), **kinds.get("Deployment", {})}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def env_file_vars(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value for key, value in pairs}


def dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile sets no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {uid}: numeric, so runAsNonRoot can verify it"
    return int(uid)


def dockerfile_home() -> str:
    return re.search(r"\bHOME=(\S+)", DOCKERFILE.read_text()).group(1)


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def config_from(text: str, env: dict[str, str], tmp_path: Path, monkeypatch) -> DynalignConfig:
    """The config a process sees: this file (DYNALIGN_CONFIG) under these environment variables
    and no others."""
    path = tmp_path / f"{uuid.uuid4().hex}.toml"
    path.write_text(text)
    for key in [k for k in os.environ if k.startswith("DYNALIGN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DYNALIGN_CONFIG", str(path))
    return DynalignConfig()


def pod_env(container: dict) -> dict[str, str]:
    """The container's env with its secrets replaced by stand-ins."""
    env = literal_env(container)
    for e in container.get("env", []):
        if "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = SECRET_STAND_INS[e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def image_tag(ref: str) -> str | None:
    if "@sha256:" in ref:
        return ref.rsplit("@", 1)[1]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# -- the manifests as a whole ---------------------------------------------------------------------
def test_kustomization_lists_every_manifest():
    resources = kustomize_resources()
    on_disk = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(resources) == sorted(on_disk), "kustomization.yaml and deploy/k8s differ"
    documents = k8s_documents()
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in documents]
    assert len(keys) == len(set(keys)), "two objects share a kind and name"
    assert all(
        doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dynalign" for doc in documents
    )


def test_manifests_pass_the_kubernetes_schema():
    """Strict: an unknown or misspelt field fails (kubectl would reject or silently drop it)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extra"
    )
    for doc in k8s_documents():
        # 1.27: the oldest release deploy/README.md supports (StatefulSet claim retention).
        kubernetes_validate.validate(doc, "1.27", strict=True)


def test_compose_file_passes_the_compose_schema():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is in the test extra")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_object_store_overlay_puts_the_registry_on_a_shared_class_kept_in_a_bucket():
    """deploy/k8s/object-store: the base deployment, its registry claim on a ReadWriteMany class
    that JuiceFS's CSI driver backs with an S3-compatible bucket, whose credentials come from a
    Secret made from a git-ignored env file."""
    overlay_dir = K8S / "object-store"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../"  # everything else as in the base
    (storage_class,) = [
        doc
        for name in overlay["resources"][1:]
        for doc in yaml.safe_load_all((overlay_dir / name).read_text())
    ]
    (patch,) = overlay["patches"]
    claim = by_kind()["PersistentVolumeClaim"][patch["target"]["name"]]
    for op in yaml.safe_load(patch["patch"]):  # JSON patch: what kustomize applies
        assert op["op"] == "add", op
        *parents, leaf = op["path"].strip("/").split("/")
        node = claim
        for key in parents:
            node = node[key]
        node[leaf] = op["value"]
    assert claim["metadata"]["name"] == "dynalign-adapters"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    assert storage_class["provisioner"] == "csi.juicefs.com"
    assert storage_class["reclaimPolicy"] == "Retain"  # published adapters outlive the claim
    secret_names = {
        value for key, value in storage_class["parameters"].items() if key.endswith("secret-name")
    }
    example = overlay_dir / "juicefs.env.example"
    assert secret_names == {"dynalign-registry-juicefs"}
    assert f"create secret generic {secret_names.pop()}" in example.read_text()
    assert env_file_vars(example).keys() == {
        "name", "metaurl", "storage", "bucket", "access-key", "secret-key"
    }  # fmt: skip
    assert not any(env_file_vars(example).values())
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", str(overlay_dir / "juicefs.env")]
    )
    assert ignored.returncode == 0, "the real credentials file is not git-ignored"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in (storage_class, claim):
        kubernetes_validate.validate(doc, "1.27", strict=True)


# -- servers: durable outbox, drain ---------------------------------------------------------------
def test_servers_are_a_statefulset_with_an_outbox_claim_per_replica():
    kinds = by_kind()
    assert "dynalign-server" not in kinds.get("Deployment", {})
    server = kinds["StatefulSet"]["dynalign-server"]
    spec = server["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()

    # A headless governing Service, and a normal one for clients, both on the pods' http port.
    headless = kinds["Service"][spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    client = kinds["Service"]["dynalign-server"]
    assert client["spec"].get("clusterIP") != "None"
    for service in (headless, client):
        assert service["spec"]["selector"].items() <= pod_labels.items()

    # The outbox directory is a per-replica claim, not pod-lifetime storage.
    (container,) = spec["template"]["spec"]["containers"]
    outbox_dir = literal_env(container)["DYNALIGN_SERVING__OUTBOX_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == outbox_dir)
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    assert mount["name"] in claims, f"{outbox_dir} is not a volumeClaimTemplates volume"
    assert mount["name"] not in {v["name"] for v in pod_spec(server).get("volumes", [])}
    assert claims[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Scaling down or deleting the set keeps the claims, and the records on them.
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    assert "Delete" not in retention.values()

    # No emptyDir anywhere holds an outbox.
    for workload in workloads().values():
        for c in containers(workload):
            if "DYNALIGN_SERVING__OUTBOX_DIR" in literal_env(c):
                assert workload["kind"] == "StatefulSet"


def test_server_grace_period_covers_the_drain():
    server = workloads()["dynalign-server"]
    (container,) = pod_spec(server)["containers"]
    grace = pod_spec(server)["terminationGracePeriodSeconds"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = int(pre_stop["exec"]["command"][-1]) if pre_stop else 0
    assert grace >= pre_stop_s + 2 * DRAIN_BUDGET_S, (
        f"grace {grace} s: preStop {pre_stop_s} s + drain {DRAIN_BUDGET_S} s, doubled"
    )

    stop = compose()["services"]["server"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", stop) and int(stop[:-1]) >= 2 * DRAIN_BUDGET_S, (
        f"compose stop_grace_period {stop}: Docker's default 10 s cuts the drain short"
    )


# -- every container ------------------------------------------------------------------------------
def test_every_container_runs_hardened():
    uid = dockerfile_uid()
    for name, workload in workloads().items():
        spec = pod_spec(workload)
        assert spec.get("automountServiceAccountToken") is False, name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, where
            assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert not context.get("privileged"), where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            # Decided per container (Kafka's image writes its config into itself at start).
            assert isinstance(context.get("readOnlyRootFilesystem"), bool), where
            if name in DYNALIGN_WORKLOADS:
                assert context["runAsUser"] == uid, f"{where}: the image's user is {uid}"
                assert context["readOnlyRootFilesystem"] is True, where
                # The caches and scratch the engine writes are mounted writable.
                writable = {
                    m["mountPath"]
                    for m in container["volumeMounts"]
                    if "emptyDir" in volumes.get(m["name"], {})
                }
                assert {dockerfile_home(), "/tmp"} <= writable, where


def test_every_container_has_resources_and_probes():
    for name, workload in workloads().items():
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
            assert {"cpu", "memory"} <= resources.get("limits", {}).keys(), where
            assert {"livenessProbe", "readinessProbe"} <= container.keys(), where
            ports = {p["name"] for p in container.get("ports", [])} | {
                p["containerPort"] for p in container.get("ports", [])
            }
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    probe = container[kind]
                    action = probe.get("httpGet") or probe.get("tcpSocket")
                    assert action and action["port"] in ports, f"{where} {kind}"
    (server,) = pod_spec(workloads()["dynalign-server"])["containers"]
    # The model loads before /health answers; readiness follows /health.
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_images_are_pinned():
    refs = {
        f"k8s {name}/{c['name']}": c["image"]
        for name, workload in workloads().items()
        for c in containers(workload)
    }
    refs |= {f"compose {name}": s["image"] for name, s in compose()["services"].items()}
    refs |= {
        f"Dockerfile FROM {i}": ref
        for i, ref in enumerate(re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M))
    }
    for where, ref in refs.items():
        tag = image_tag(ref)
        assert tag and tag != "latest", f"{where}: {ref} is not pinned"
    # dynalign's own image is tagged with the project's version wherever it is named.
    version = project_version()
    for where, ref in refs.items():
        if ref.rsplit("/", 1)[-1].startswith("dynalign:"):
            assert image_tag(ref) == version, f"{where}: {ref}, the project is {version}"
    for path in (DOCKERFILE, DEPLOY / "README.md"):
        for ref in re.findall(r"-t (\S+)", path.read_text()):
            assert ref == f"dynalign:{version}", f"{path}: builds {ref}"


# -- secrets and exposure -------------------------------------------------------------------------
def test_secrets_come_from_secret_references_only():
    kinds = by_kind()
    assert "Secret" not in kinds, "secret values are never checked in (deploy/README.md)"
    for name, workload in workloads().items():
        for container in containers(workload):
            assert not container.get("envFrom"), "one way: secretKeyRef per variable"
            for e in container.get("env", []):
                if SECRET_LIKE.search(e["name"]):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in e, f"{name}: {e['name']} is a literal"
                    assert ref["name"] == SECRET_NAME and ref["key"] == e["name"]
                    assert not ref.get("optional"), f"{name}: start without {e['name']}?"
    server_secrets = {
        e["name"]
        for c in containers(workloads()["dynalign-server"])
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert server_secrets == SECRET_VARS
    # Least privilege: nothing else gets them.
    for name, workload in workloads().items():
        if name != "dynalign-server":
            assert not any(
                "valueFrom" in e
                for c in containers(workload)
                for e in c.get("env", [])
                if SECRET_LIKE.search(e["name"])
            ), name

    toml = kinds["ConfigMap"]["dynalign-config"]["data"]["dynalign.toml"]
    for text in (toml, (DEPLOY / "config" / "dynalign.toml").read_text()):
        for field in ("api_keys", "operator_tokens", "user_hash_salt"):
            assert field not in text
    for name, service in compose()["services"].items():
        assert not SECRET_VARS & compose_env(service).keys(), f"compose {name}: literal secret"


def test_nothing_serves_without_keys():
    """No --insecure-no-auth anywhere, and the chat servers get API keys."""
    texts = [
        path.read_text()
        for path in (*K8S.glob("*.yaml"), COMPOSE_FILE, DEPLOY / "config" / "dynalign.toml")
    ]
    assert not any("insecure" in text.lower() for text in texts)
    assert "DYNALIGN_SERVING__API_KEYS" in env_file_vars(COMPOSE_DIR / "secrets.env.example")
    assert "secrets.env" in compose()["services"]["server"]["env_file"]


def test_compose_env_files_are_examples_checked_in_and_real_files_ignored():
    files = {
        Path(f) for service in compose()["services"].values() for f in service.get("env_file", [])
    }
    assert files == {Path("secrets.env"), Path("grafana.env")}
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--", str(COMPOSE_DIR)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        real, example = COMPOSE_DIR / name, COMPOSE_DIR / f"{name}.example"
        assert example.is_file(), f"{example} is missing"
        assert str(example.relative_to(REPO)) in tracked
        ignored = subprocess.run(
            ["git", "-C", str(REPO), "check-ignore", "-q", str(real)], check=False
        )
        assert ignored.returncode == 0, f"{real} is not git-ignored"
        assert str(real.relative_to(REPO)) not in tracked
        # Placeholders are empty: an example copied unfilled refuses to start, never runs
        # with a known key, salt or password.
        values = env_file_vars(example)
        assert values and not any(values.values()), f"{example} has non-empty values"
    assert env_file_vars(COMPOSE_DIR / "secrets.env.example").keys() == SECRET_VARS
    assert env_file_vars(COMPOSE_DIR / "grafana.env.example").keys() == {
        "GF_SECURITY_ADMIN_PASSWORD"
    }
    # `COPY . .` must not bake the real files into the image.
    dockerignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert "**/*.env" in dockerignore


def test_compose_publishes_on_loopback_and_grafana_has_no_default_credentials():
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None
            assert host and ipaddress.ip_address(host).is_loopback, (
                f"compose {name} publishes {port} beyond this host"
            )
    grafana = services["grafana"]
    env = compose_env(grafana)
    assert not {"GF_SECURITY_ADMIN_PASSWORD", "GF_SECURITY_ADMIN_USER"} & env.keys(), (
        "Grafana's credentials come from grafana.env"
    )
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # Grafana falls back to admin/admin on an empty password: it must refuse to start then.
    entrypoint = " ".join(grafana["entrypoint"])
    assert '[ -n "$${GF_SECURITY_ADMIN_PASSWORD}" ] ||' in entrypoint
    assert entrypoint.endswith("exec /run.sh")


# -- Kafka and the topics -------------------------------------------------------------------------
def test_topics_are_replicated_three_ways_with_two_in_sync():
    # dynalign's own topics: server and learner (either creates them) on both deployments.
    for name in DYNALIGN_WORKLOADS:
        for container in containers(workloads()[name]):
            assert TOPIC_VARS.items() <= literal_env(container).items(), f"k8s {name}"
        assert TOPIC_VARS.items() <= compose_env(compose()["services"][name.split("-")[1]]).items()

    # Three KRaft brokers with the same broker defaults, in compose and on Kubernetes.
    broker_defaults = {
        "KAFKA_DEFAULT_REPLICATION_FACTOR": "3",
        "KAFKA_MIN_INSYNC_REPLICAS": "2",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "2",
    }
    kafka_services = {n: s for n, s in compose()["services"].items() if n.startswith("kafka")}
    assert len(kafka_services) == 3
    cluster_ids = set()
    for name, service in kafka_services.items():
        env = compose_env(service)
        assert broker_defaults.items() <= env.items(), f"compose {name}"
        assert "controller" in env["KAFKA_PROCESS_ROLES"]
        assert f"{env['KAFKA_NODE_ID']}@{name}:9093" in env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3
        cluster_ids.add(env["CLUSTER_ID"])
    assert len(cluster_ids) == 1

    kinds = by_kind()
    kafka = kinds["StatefulSet"]["kafka"]
    assert kafka["spec"]["replicas"] == 3
    assert kafka["spec"]["podManagementPolicy"] == "Parallel"  # the quorum needs all three
    assert kinds["Service"][kafka["spec"]["serviceName"]]["spec"]["publishNotReadyAddresses"]
    (container,) = pod_spec(kafka)["containers"]
    env = literal_env(container)
    assert broker_defaults.items() <= env.items()
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    headless = kafka["spec"]["serviceName"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",") == [
        f"{i}@kafka-{i}.{headless}:9093" for i in range(3)
    ]
    assert "${HOSTNAME##*-}" in " ".join(container["command"])  # node.id = pod ordinal
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://$(POD_NAME).{headless}:9092"
    assert {"data"} == {t["metadata"]["name"] for t in kafka["spec"]["volumeClaimTemplates"]}
    (data,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"]
    assert Path(env["KAFKA_LOG_DIRS"]).parent == Path(data)  # not the root: lost+found
    # Voluntary disruptions keep two of three in sync.
    assert kinds["PodDisruptionBudget"]["kafka"]["spec"]["maxUnavailable"] == 1


def test_every_dynalign_variable_names_a_config_field():
    names = {
        e["name"] for w in workloads().values() for c in containers(w) for e in c.get("env", [])
    }
    names |= {k for s in compose()["services"].values() for k in compose_env(s)}
    names |= env_file_vars(COMPOSE_DIR / "secrets.env.example").keys()
    unknown = set()
    for name in sorted(n for n in names if n.startswith("DYNALIGN_") and n != "DYNALIGN_CONFIG"):
        section, _, field = name.removeprefix("DYNALIGN_").lower().partition("__")
        model = DynalignConfig.model_fields.get(section)
        if model is None or field not in model.annotation.model_fields:
            unknown.add(name)
    assert not unknown, f"not config fields: {sorted(unknown)}"


# -- the learner ----------------------------------------------------------------------------------
def test_learner_is_a_single_instance():
    kinds = by_kind()
    learner = kinds["Deployment"]["dynalign-learner"]
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}
    assert "HorizontalPodAutoscaler" not in kinds
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(learner)["volumes"]
        if "persistentVolumeClaim" in v
    }
    checkpoints = kinds["PersistentVolumeClaim"]["dynalign-learner"]
    assert checkpoints["metadata"]["name"] in claims
    assert checkpoints["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "deploy" not in compose()["services"]["learner"]  # no replicas in compose either


# -- deploy/ against the config -------------------------------------------------------------------
def test_compose_file_references_what_exists_and_agrees_with_the_config(tmp_path, monkeypatch):
    services = compose()["services"]
    assert set(services) == {
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "server",
        "learner",
        "prometheus",
        "grafana",
    }

    # service -> container path -> host path (bind mounts) or volume name
    mounts: dict[str, dict[str, Path | str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                source = (COMPOSE_DIR / source).resolve()
                assert source.exists(), f"{name} mounts {volume}: no such file"
            else:
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"
            mounts.setdefault(name, {})[target] = source
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file()
    # Server and learner run `dynalign serve|learn` on the mounted config file.
    assert services["server"]["command"][0] == "serve"
    assert services["learner"]["command"][0] == "learn"
    for name in ("server", "learner"):
        env = compose_env(services[name])
        for env_file in services[name].get("env_file", []):
            env |= {
                k: SECRET_STAND_INS[k] for k in env_file_vars(COMPOSE_DIR / f"{env_file}.example")
            }
        config_file = mounts[name][env["DYNALIGN_CONFIG"]]
        config = config_from(config_file.read_text(), env, tmp_path, monkeypatch)
        assert config.serving.port == ServingConfig().port
        assert config.learner.metrics_port == LearnerConfig().metrics_port
        # Every bootstrap address is a broker advertising itself under that address.
        for address in config.kafka.bootstrap.split(","):
            host, port = address.split(":")
            assert (
                host in services
                and f"//{host}:{port}"
                in services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
            )
        # The learner publishes versions where the server follows them: one shared volume.
        store = str(config.registry.store)
        assert mounts["server"][store] == mounts["learner"][store] in compose()["volumes"]
        if name == "server":
            # The outbox is a named volume: records not yet in Kafka survive the container.
            assert mounts["server"][str(config.serving.outbox_dir)] in compose()["volumes"]
            assert config.serving.api_keys and not config.serving.insecure_no_auth
    port = ServingConfig().port
    assert services["server"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert str(LearnerConfig().metrics_port) in services["learner"]["expose"]
    # Prometheus scrapes the compose services by name and loads the rules beside its config.
    for job, targets in scrape_targets().items():
        for target in targets:
            assert target.split(":")[0] in services, f"{job} scrapes unknown {target}"
    prometheus_dir = mounts["prometheus"]["/etc/prometheus"]
    assert prometheus_dir == SCRAPE_CONFIG.parent
    for rule_file in yaml.safe_load(SCRAPE_CONFIG.read_text())["rule_files"]:
        assert (prometheus_dir / rule_file).is_file()
    # Grafana gets the provisioning, and the dashboards where the provider looks for them.
    grafana = mounts["grafana"]
    assert grafana["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dynalign.yml").read_text()
    )
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana[dashboards_path] == DEPLOY / "grafana" / "dashboards"
    datasource_url = next(
        iter(
            yaml.safe_load(
                next(
                    (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yml")
                ).read_text()
            )["datasources"]
        )
    )["url"]
    assert datasource_url == "http://prometheus:9090"


def test_kubernetes_manifests_agree_with_the_config(tmp_path, monkeypatch):
    kinds = by_kind()
    assert set(kinds["StatefulSet"]) == {"dynalign-server", "kafka"}
    assert set(kinds["Deployment"]) == {"dynalign-learner"}
    config_map = kinds["ConfigMap"]["dynalign-config"]
    expected_port = {
        "dynalign-server": ServingConfig().port,
        "dynalign-learner": LearnerConfig().metrics_port,
    }
    claims = set(kinds["PersistentVolumeClaim"])
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]
        assert (
            workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        )
        claims_here = claims | {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        container = pod["spec"]["containers"][0]
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes or mount["name"] in claims_here, f"{name}: {mount}"
            volume = volumes.get(mount["name"], {})
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        if name not in DYNALIGN_WORKLOADS:
            continue
        assert container["args"][0] == DYNALIGN_WORKLOADS[name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [expected_port[name]]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(expected_port[name])
        assert annotations["prometheus.io/path"] == "/metrics"
        config_mount = next(
            m for m in container["volumeMounts"] if "configMap" in volumes.get(m["name"], {})
        )
        assert volumes[config_mount["name"]]["configMap"]["name"] == "dynalign-config"
        config_file = Path(config_mount["mountPath"]) / "dynalign.toml"
        assert literal_env(container)["DYNALIGN_CONFIG"] == str(config_file)

        config = config_from(
            config_map["data"]["dynalign.toml"], pod_env(container), tmp_path, monkeypatch
        )
        assert config.serving.port == ServingConfig().port
        assert config.learner.metrics_port == LearnerConfig().metrics_port
        # The registry store is the claim every replica and the learner share.
        store = next(
            m for m in container["volumeMounts"] if m["mountPath"] == str(config.registry.store)
        )
        shared = kinds["PersistentVolumeClaim"][
            volumes[store["name"]]["persistentVolumeClaim"]["claimName"]
        ]
        assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
        # Kafka is bootstrapped through the brokers' client Service.
        (address,) = config.kafka.bootstrap.split(",")
        host, port = address.split(":")
        service = kinds["Service"][host]
        assert (
            service["spec"]["selector"].items()
            <= kinds["StatefulSet"]["kafka"]["spec"]["template"]["metadata"]["labels"].items()
        )
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        if name == "dynalign-server":
            # It listens beyond loopback, so it must have keys (it refuses to start otherwise).
            assert not ipaddress.ip_address(config.serving.host).is_loopback
            assert config.serving.api_keys and not config.serving.insecure_no_auth
            assert config.serving.user_hash_salt is not None
            service = kinds["Service"]["dynalign-server"]
            assert service["spec"]["ports"][0]["port"] == ServingConfig().port
            assert service["spec"]["ports"][0]["targetPort"] in ports
