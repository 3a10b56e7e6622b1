"""deploy/kubernetes: every manifest validates against a pinned Kubernetes version's schemas
(kubernetes-validate, strict: unknown fields fail), and agrees with the gateway's code: env
names are settings of `sse-gateway serve`, their values parse, the shutdown fits in the grace
period, the ports and probes are the gateway's, and a real gateway started with the
manifest's env answers each probe on the port the probe names. docs/operations.md
("Kubernetes: the deploy files") describes the files.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.procs import REPO, GatewayFactory, RedisServer, free_port
from support.sse import request

from sse_gateway.cli import build_parser
from sse_gateway.settings import OPTIONS, Settings, load_settings

pytestmark = pytest.mark.timeout(60)

KUBE_DIR = REPO / "deploy" / "kubernetes"
#: Schemas the manifests are checked against, pinned: 1.30, the oldest minor the files are
#: written for, and 1.37, the newest that kubernetes-validate 1.37 bundles. A field newer than
#: 1.30 fails the first. Strict: a misspelt or misplaced field fails instead of being ignored.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
MANIFESTS = ("deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml")
KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
#: Seconds the gateway takes, after its drain, to close heartbeats and the broker and exit
#: (docs/operations.md, "Shutdown": "+ about a second").
EXIT_SECONDS = 1.0
#: What the grace period must leave on top: a loaded node, a slow kubelet.
MARGIN_SECONDS = 5.0
SETTING_NAMES = {option.env for option in OPTIONS}
ENV_TO_ATTR = {option.env: option.attr for option in OPTIONS}
#: Stand-ins for the values the manifests take from the Secret.
SECRET_VALUES = {
    "redis-url": "redis://127.0.0.1:6379/0",
    "jwt-secret": "deploy-test-secret-" + "0123456789abcdef" * 3,
    "publish-api-key": "deploy-test-publish-key-0123456789abcdef",
}
PORT_SETTINGS = ("port", "metrics_port")


def load(name: str) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((KUBE_DIR / name).read_text()) if doc]
    assert len(docs) == 1, f"{name}: one object per file, found {len(docs)}"
    doc: dict[str, Any] = docs[0]
    return doc


def container() -> dict[str, Any]:
    containers = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: the gateway"
    found: dict[str, Any] = containers[0]
    return found


def manifest_env(secrets: Mapping[str, str] = SECRET_VALUES) -> dict[str, str]:
    """The container's env as the gateway would see it, Secret references filled in."""
    env: dict[str, str] = {}
    for entry in container()["env"]:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "sse-gateway", entry
            env[entry["name"]] = secrets[ref["key"]]
    return env


def manifest_settings() -> Settings:
    return load_settings(manifest_env(), {}, dev=False)


def container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def probe_port(probe: Mapping[str, Any]) -> int:
    """The container port a probe's httpGet names (by name or number)."""
    port = probe["httpGet"]["port"]
    return container_ports()[port] if isinstance(port, str) else int(port)


def setting_of_port(number: int, settings: Settings) -> str:
    """Which listener a container port is: the attribute of Settings that sets it."""
    owners = [attr for attr in PORT_SETTINGS if getattr(settings, attr) == number]
    assert owners, f"container port {number} is no listener of the gateway ({PORT_SETTINGS})"
    return owners[0]


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_pinned_kubernetes(name: str, version: str) -> None:
    assert kubernetes_validate.validate(load(name), version, strict=True)


def test_every_manifest_is_checked_and_listed_in_the_kustomization() -> None:
    on_disk = {p.name for p in KUBE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(MANIFESTS), "a manifest the schema test does not cover"
    assert {load(name)["kind"] for name in MANIFESTS} == KINDS
    assert load("kustomization.yaml")["resources"] == list(MANIFESTS)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The schema test can fail: a typo that Kubernetes would silently drop is refused."""
    deployment = copy.deepcopy(load("deployment.yaml"))
    spec = deployment["spec"]["template"]["spec"]["containers"][0]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_kustomize_builds_the_four_objects() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` is not checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE_DIR)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    built = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert {doc["kind"] for doc in built} == KINDS
    (deployment,) = (doc for doc in built if doc["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    override = load("kustomization.yaml")["images"][0]
    assert image == f"{override['newName']}:{override['newTag']}"


# --------------------------------------------------------------------------- the code


def test_env_names_are_settings_of_the_gateway() -> None:
    names = [entry["name"] for entry in container()["env"]]
    assert len(names) == len(set(names)), "an env var set twice"
    assert set(names) <= SETTING_NAMES, f"not settings: {set(names) - SETTING_NAMES}"
    # The ones the docs and the arithmetic below rely on are set here, not left to defaults.
    for name in ("EVENTS_REDIS_STORAGE", "SSE_SHUTDOWN_DELAY", "SSE_DRAIN_SECONDS", "SSE_PORT"):
        assert name in names


def test_secrets_come_from_a_secret_not_the_manifest() -> None:
    for entry in container()["env"]:
        if entry["name"] in ("EVENTS_REDIS_STORAGE", "SSE_JWT_SECRET", "SSE_PUBLISH_API_KEY"):
            assert "secretKeyRef" in entry.get("valueFrom", {}), entry


def test_env_values_parse_as_the_gateway_parses_them() -> None:
    settings = manifest_settings()
    assert settings.redis is not None
    assert settings.shutdown_delay > 0, "without a delay the balancer sees refused connections"
    assert settings.workers == 1, "per-pod /metrics and the HPA count assume one worker"


def test_grace_period_covers_the_shutdown_sequence() -> None:
    settings = manifest_settings()
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    # A `preStop` sleep runs before SIGTERM and counts against the same grace period.
    pre_stop = container().get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds", 0)
    assert "exec" not in pre_stop, "an exec preStop's length cannot be checked here"
    needed = pre_stop_seconds + settings.shutdown_delay + settings.drain_seconds + EXIT_SECONDS
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= needed + MARGIN_SECONDS, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop_seconds} + delay "
        f"{settings.shutdown_delay} + drain {settings.drain_seconds} + {EXIT_SECONDS} + margin"
    )


def test_container_ports_are_the_gateway_listeners() -> None:
    settings = manifest_settings()
    ports = container_ports()
    assert ports["http"] == settings.port
    assert ports["metrics"] == settings.metrics_port
    assert settings.metrics_host == "0.0.0.0", "Prometheus scrapes the pod's address"
    annotations = load("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    (service_port,) = load("service.yaml")["spec"]["ports"]
    assert service_port["targetPort"] == "http", "the Service exposes the public port only"


def test_container_runs_the_gateway_serve_command() -> None:
    """The command is the package's console script (pyproject.toml) and `serve` one of its
    subcommands: the gateway is process 1, with no shell to swallow SIGTERM and SIGHUP."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    spec = container()
    assert spec["command"] == ["sse-gateway"] and "sse-gateway" in scripts
    assert build_parser().parse_args(spec["args"]).command == "serve"


def test_probes_use_the_gateway_health_paths() -> None:
    spec = container()
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(spec[kind]) in container_ports().values(), kind


def test_selectors_and_targets_meet() -> None:
    deployment = load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert load("service.yaml")["spec"]["selector"].items() <= labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = load("hpa.yaml")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_scales_on_the_documented_connections_gauge() -> None:
    hpa = load("hpa.yaml")["spec"]
    (pods,) = (m["pods"] for m in hpa["metrics"] if m["type"] == "Pods")
    name = pods["metric"]["name"]
    assert name == "sse_gateway_connections"
    # docs/metrics.md is the contract of the names: the metric is there, as a gauge.
    rows = [
        line
        for line in (REPO / "docs" / "metrics.md").read_text().splitlines()
        if line.startswith(f"| `{name}` |")
    ]
    assert len(rows) == 1 and "| gauge |" in rows[0], rows
    # The target leaves room for a lost pod's clients: at most half the per-pod limit.
    target = float(pods["target"]["averageValue"])
    assert 0 < target <= manifest_settings().connection_limit / 2


# --------------------------------------------------------------------------- a real gateway


def test_a_gateway_with_the_manifest_env_answers_every_probe(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """The manifest's env, with loopback ports and the test's Redis, starts a gateway; each
    probe's path answers 200 on the listener its port names, and the Service's port (the
    public one) does not serve /metrics."""
    settings = manifest_settings()
    test_ports = {attr: free_port() for attr in PORT_SETTINGS}
    env = manifest_env({**SECRET_VALUES, "redis-url": redis_server.url})
    env["SSE_METRICS_HOST"] = "127.0.0.1"
    for attr, port in test_ports.items():
        env[next(name for name, a in ENV_TO_ATTR.items() if a == attr)] = str(port)
    gateway = gateway_factory(env=env, jwt_secret=None)
    # The harness passes --port; the manifest's SSE_PORT maps to it.
    test_ports["port"] = gateway.port

    spec = container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        listener = setting_of_port(probe_port(spec[kind]), settings)
        answer = request(test_ports[listener], "GET", spec[kind]["httpGet"]["path"], timeout=5)
        assert answer.status == 200, (kind, listener, answer.status, answer.body)
    metrics_listener = setting_of_port(container_ports()["metrics"], settings)
    assert request(test_ports[metrics_listener], "GET", "/metrics", timeout=5).status == 200
    assert gateway.get("/metrics", timeout=5).status == 404


def test_a_probe_on_a_port_the_gateway_does_not_listen_on_is_caught() -> None:
    """`setting_of_port` fails for a container port that is neither listener."""
    settings = manifest_settings()
    unknown = max(container_ports().values()) + 1
    with pytest.raises(AssertionError):
        setting_of_port(unknown, settings)


def test_unknown_env_name_would_be_caught() -> None:
    """The settings list is read from the code, not written here: a made-up name is not in it."""
    assert "SSE_DRAIN_TIMEOUT" not in SETTING_NAMES
    assert {"SSE_DRAIN_SECONDS", "SSE_SHUTDOWN_DELAY", "EVENTS_REDIS_STORAGE"} <= SETTING_NAMES
