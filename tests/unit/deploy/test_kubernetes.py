"""The Kubernetes manifests, checked without a cluster.

Every overlay is rendered with the kustomize built into kubectl, every object is validated
against the Kubernetes API schemas of the versions below (kubernetes-validate ships them), and
the invariants the services depend on are asserted: probes on the right port and health names,
the headless read Service, disruption budgets, non-root read-only containers, the migration
before the services, settings that the processes really read, and the same commands as
docker-compose.yml.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from payment_provider.service import ADMIN_SERVICE, PROVIDER_SERVICE
from payment_provider.settings import PaymentProviderSettings
from read_service.entrypoints import catalog_queries, order_queries
from read_service.entrypoints.grpc_server import SERVICE_NAME as USER_QUERY_SERVICE
from read_service.settings import ReadServiceSettings
from read_service.workers import STOP_MARGIN_S
from relay.settings import RelaySettings
from shared_kernel.platform.settings import MetricsSettings
from write_service.entrypoints.catalog import CATALOG_SERVICE_NAME
from write_service.entrypoints.orders import ORDER_SERVICE_NAME
from write_service.entrypoints.users import USER_SERVICE_NAME as USER_COMMAND_SERVICE
from write_service.saga.admin_service import SERVICE_NAME as SAGA_ADMIN_SERVICE
from write_service.saga.settings import SagaWorkerSettings
from write_service.settings import MigrateSettings, WriteServiceSettings

ROOT = Path(__file__).resolve().parents[3]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
RENDER_TIMEOUT_S = 60

# The oldest version the manifests need (native grpc probes: 1.24; the preStop `sleep` action is
# on by default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
OVERLAYS = {"dev": "tessera-dev", "production": "tessera"}
# Custom resources of the Prometheus Operator: no schema ships for them, their shape is checked below.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
IMAGE = "tessera"

# The process a container runs (its `python -m` module), the role it plays, and the settings it reads.
MODULES = {
    "write_service": "write",
    "write_service.migrate": "migrate",
    "relay": "relay",
    "read_service": "read",
    "write_service.saga": "saga-worker",
    "payment_provider": "payment-provider",
}
SETTINGS: dict[str, type[BaseSettings]] = {
    "write": WriteServiceSettings,
    "migrate": MigrateSettings,
    "relay": RelaySettings,
    "read": ReadServiceSettings,
    "saga-worker": SagaWorkerSettings,
    "payment-provider": PaymentProviderSettings,
}
# Processes that call shared_kernel.platform.metrics.configure_metrics (MetricsSettings) and the OpenTelemetry SDK.
WITH_METRICS = {"write", "relay", "read", "saga-worker"}
WITH_TELEMETRY = {"write", "relay", "read", "saga-worker", "payment-provider"}
# The health names each gRPC process registers ("" is the server as a whole), and the one its
# readiness probe asks for.
HEALTH_NAMES = {
    "write": {"", USER_COMMAND_SERVICE, CATALOG_SERVICE_NAME, ORDER_SERVICE_NAME, SAGA_ADMIN_SERVICE},
    "read": {"", USER_QUERY_SERVICE, catalog_queries.SERVICE_NAME, order_queries.SERVICE_NAME},
    "saga-worker": {""},
    "payment-provider": {"", PROVIDER_SERVICE, ADMIN_SERVICE},
}
READINESS_NAME = {
    "write": USER_COMMAND_SERVICE,
    "read": USER_QUERY_SERVICE,
    "saga-worker": "",
    "payment-provider": PROVIDER_SERVICE,
}
# Keys of the Secret `tessera-secrets` the production operator creates (docs/kubernetes.md).
PRODUCTION_SECRET_KEYS = {
    "DATABASE_URL",
    "REDIS_URL",
    "AUTH_SIGNING_KEY",
    "PAGE_TOKEN_SECRET",
    "AUTH_PREVIOUS_SIGNING_KEY",
}
COMPOSE_SERVICE = {
    "write": "write",
    "migrate": "migrate",
    "relay": "relay",
    "read": "read",
    "saga-worker": "saga-worker",
    "payment-provider": "payment-provider",
}
# Variables only the cluster sets: the Prometheus endpoint (the compose stack exports metrics
# over OTLP to its collector instead) and the previous signing key during a rotation.
KUBERNETES_ONLY_ENV = {"METRICS_PORT", "METRICS_HOST", "AUTH_PREVIOUS_SIGNING_KEY"}


def _otel_variables() -> set[str]:
    import opentelemetry.environment_variables as api_variables
    import opentelemetry.sdk.environment_variables as sdk_variables

    return {
        value
        for module in (api_variables, sdk_variables)
        for name, value in vars(module).items()
        if name.startswith("OTEL_") and isinstance(value, str)
    }


def settings_env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a pydantic-settings class reads (upper case; its prefix and aliases applied)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add((prefix + name).upper())
    return names


def accepted_env(role: str) -> set[str]:
    """Every variable the process of `role` reads: its settings, the metrics settings, OpenTelemetry's."""
    names = settings_env_names(SETTINGS[role])
    if role in WITH_METRICS:
        names |= settings_env_names(MetricsSettings)
    if role in WITH_TELEMETRY:
        names |= _otel_variables()
    return names


# --- rendering --------------------------------------------------------------------------


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`, parsed."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed for {directory}:\n{result.stderr}"
    objects = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    assert objects, f"{directory} rendered nothing"
    return objects


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay rendered, plus `all`: the base with every component (what no overlay combines)."""
    out = {name: render(KUSTOMIZE_DIR / "overlays" / name) for name in OVERLAYS}
    combined = tmp_path_factory.mktemp("kustomize-all")
    # kustomize refuses absolute paths to other kustomizations; relative ones may leave the root.
    to_repo = Path(os.path.relpath(KUSTOMIZE_DIR, combined))
    (combined / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "all-components",
                "resources": [str(to_repo / "base")],
                "components": [str(to_repo / "components" / name) for name in ("payment-provider", "monitoring")],
                "images": [{"name": IMAGE, "newTag": "all-components"}],
            }
        )
    )
    out["all"] = render(combined)
    return out


RENDERED_NAMES = [*OVERLAYS, "all"]


def _find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = _find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _role(container: dict[str, Any]) -> str | None:
    """The role a container of ours plays, from its `python -m <module>` command; None for others."""
    command = container.get("command", [])
    if command[:2] == ["python", "-m"]:
        assert len(command) == 3 and command[2] in MODULES, f"{container['name']}: unknown role {command}"
        return MODULES[command[2]]
    assert not container["image"].startswith(IMAGE + ":"), f"{container['name']}: our image without a known command"
    return None


def _ours(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """(workload, container, role) for every container of ours, init containers included."""
    for workload in objects:
        if workload["kind"] in WORKLOAD_KINDS:
            for container in _containers(_pod_spec(workload)):
                role = _role(container)
                if role is not None:
                    yield workload, container, role


def _main_container(objects: list[dict[str, Any]], role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    found = [
        (w, c) for w, c, r in _ours(objects) if r == role and c in _pod_spec(w)["containers"] and w["kind"] != "Job"
    ]
    assert len(found) == 1, f"expected one long-running {role} container, found {len(found)}"
    return found[0]


def _env_sources(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = container.get("env", [])
    names = [entry["name"] for entry in env]
    assert len(names) == len(set(names)), f"{container['name']}: a variable is set twice"
    assert "envFrom" not in container, f"{container['name']}: name every variable (envFrom hides typos)"
    return {entry["name"]: entry for entry in env}


def _resolve_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """Each variable's value as the pod would see it; None for a key of a Secret this render does not hold."""
    values: dict[str, str | None] = {}
    for name, entry in _env_sources(container).items():
        if "value" in entry:
            values[name] = str(entry["value"])
            continue
        source = entry["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            [config] = _find(objects, "ConfigMap", ref["name"])
            assert ref["key"] in config["data"], f"{name}: ConfigMap {ref['name']} has no key {ref['key']}"
            values[name] = config["data"][ref["key"]]
        else:
            ref = source["secretKeyRef"]
            secrets = _find(objects, "Secret", ref["name"])
            if not secrets:
                assert ref["name"] == "tessera-secrets", f"{name}: unknown Secret {ref['name']}"
                assert ref["key"] in PRODUCTION_SECRET_KEYS, f"{name}: {ref['key']} is not a documented Secret key"
                values[name] = None
                continue
            [secret] = secrets
            data = secret.get("data", {})
            if ref["key"] not in data:
                assert ref.get("optional") is True, f"{name}: Secret {ref['name']} has no key {ref['key']}"
                continue
            values[name] = base64.b64decode(data[ref["key"]]).decode()
    return values


# --- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_every_overlay_renders_into_its_namespace(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    objects = rendered[overlay]
    namespace = OVERLAYS.get(overlay, "all-components")
    [ns] = _find(objects, "Namespace")
    assert ns["metadata"]["name"] == namespace
    # Pod Security Admission holds every pod to the `restricted` profile.
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
):
    custom = []
    for obj in rendered[overlay]:
        if obj["kind"] in CUSTOM_KINDS:
            custom.append(obj["kind"])
            continue
        # Strict: a misspelt or misplaced field is an error, not something the API server drops.
        kubernetes_validate.validate(obj, version, strict=True)
    if overlay == "dev":
        assert custom == [], "the dev overlay needs no operator"
    else:
        assert sorted(custom) == sorted(CUSTOM_KINDS)


def test_schema_validation_rejects_a_broken_manifest(rendered: dict[str, list[dict[str, Any]]]):
    deployment = copy.deepcopy(_one(rendered["dev"], "Deployment", "tessera-write"))
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    probe = _pod_spec(deployment)["containers"][0]["readinessProbe"]
    probe["grpc"]["serviceName"] = probe["grpc"].pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_one(rendered["dev"], "Deployment", "tessera-write"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# --- one image, every role -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_every_role_runs_one_image(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    objects = rendered[overlay]
    images = {container["image"] for _, container, _ in _ours(objects)}
    assert len(images) == 1, images
    [image] = images
    name, _, tag = image.rpartition(":")
    assert name.rsplit("/", 1)[-1] == IMAGE
    assert tag and tag != "latest", "a pinned tag, so every pod of a rollout runs the same build"
    roles = {role for _, _, role in _ours(objects)}
    expected = set(MODULES.values()) - ({"payment-provider"} if overlay == "production" else set())
    assert roles == expected


def test_dev_runs_the_local_build_and_production_a_release(rendered: dict[str, list[dict[str, Any]]]):
    [(_, write)] = [_main_container(rendered["dev"], "write")]
    assert write["image"] == "tessera:local"
    assert write.get("imagePullPolicy", "IfNotPresent") == "IfNotPresent", "a loaded image, never pulled"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    _, write = _main_container(rendered["production"], "write")
    assert write["image"].endswith(":" + version)


# --- probes and services -------------------------------------------------------------------


def _port(container: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return int(port)


@pytest.mark.parametrize("role", sorted(HEALTH_NAMES))
def test_grpc_probes_ask_the_health_service_for_the_process_own_names(
    rendered: dict[str, list[dict[str, Any]]], role: str
):
    _, container = _main_container(rendered["all"], role)
    port = _port(container, "grpc")
    assert int(_resolve_env(rendered["all"], container)["GRPC_PORT"] or 0) == port
    readiness = container["readinessProbe"]["grpc"]
    assert readiness["port"] == port
    assert readiness.get("service", "") == READINESS_NAME[role]
    startup = container["startupProbe"]["grpc"]
    assert startup["port"] == port
    assert startup.get("service", "") in HEALTH_NAMES[role]
    liveness = container["livenessProbe"]
    if role == "read":
        # Every health name of a replica follows its catch-up; liveness must not restart a replica
        # that is only behind, so it checks the port (see the comment in base/read.yaml).
        assert liveness["tcpSocket"]["port"] == port
    else:
        assert liveness["grpc"]["port"] == port
        assert liveness["grpc"].get("service", "") in HEALTH_NAMES[role]


def test_a_read_replica_has_minutes_to_catch_up_before_liveness_counts(rendered: dict[str, list[dict[str, Any]]]):
    _, read = _main_container(rendered["all"], "read")
    startup = read["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # Readiness: out of rotation within seconds of falling behind.
    readiness = read["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15


def test_relay_liveness_is_the_compose_health_check(rendered: dict[str, list[dict[str, Any]]]):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["relay"]
    _, relay = _main_container(rendered["all"], "relay")
    test = compose["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert relay["livenessProbe"]["exec"]["command"] == test[1:]
    assert "ports" not in relay or [p["name"] for p in relay["ports"]] == ["metrics"]


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_read_service_is_headless_and_write_service_is_cluster_ip(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
):
    objects = rendered[overlay]
    read = _one(objects, "Service", "tessera-read")
    assert read["spec"]["clusterIP"] == "None", "round_robin clients need every pod's address"
    assert not read["spec"].get("publishNotReadyAddresses"), "a replica that is catching up stays out of DNS"
    write = _one(objects, "Service", "tessera-write")
    assert write["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert write["spec"].get("clusterIP") != "None"
    for service, role in ((read, "read"), (write, "write")):
        workload, container = _main_container(objects, role)
        assert _selects(service["spec"]["selector"], _pod_labels(workload))
        [port] = service["spec"]["ports"]
        assert port["targetPort"] == "grpc"
        assert port["port"] == _port(container, "grpc")
        assert port["appProtocol"] == "grpc"


# --- availability: replicas, budgets, autoscaling, spreading, shutdown -----------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions, or a Service's plain map) selects `labels`."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_disruption_budgets_cover_the_read_replicas_and_the_relays(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
):
    objects = rendered[overlay]
    budgets = _find(objects, "PodDisruptionBudget")
    hpa = _one(objects, "HorizontalPodAutoscaler", "tessera-read")
    for role in ("read", "relay", "write"):
        workload, _ = _main_container(objects, role)
        [budget] = [b for b in budgets if _selects(b["spec"]["selector"], _pod_labels(workload))]
        if role == "relay":
            # One active relay and one standby; a drain never takes both.
            assert workload["spec"]["replicas"] == 2
            assert budget["spec"]["minAvailable"] == 1
        else:
            assert budget["spec"]["maxUnavailable"] == 1
    assert hpa["spec"]["minReplicas"] >= 2, "a drain of one read replica leaves one serving"


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_read_replicas_scale_on_cpu_under_an_autoscaler(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    objects = rendered[overlay]
    hpa = _one(objects, "HorizontalPodAutoscaler", "tessera-read")
    workload, container = _main_container(objects, "read")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", workload["metadata"]["name"])
    assert "replicas" not in workload["spec"], "the autoscaler owns the count; an apply must not reset it"
    [metric] = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 90
    assert container["resources"]["requests"]["cpu"], "utilization is measured against the request"
    assert hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Each replica is one process here (scale by pods); a worker group would need more metrics ports.
    assert _resolve_env(objects, container)["READ_WORKERS"] == "1"


@pytest.mark.parametrize("role", ["write", "read", "relay", "saga-worker"])
def test_replicas_spread_over_nodes(rendered: dict[str, list[dict[str, Any]]], role: str):
    workload, _ = _main_container(rendered["all"], role)
    constraints = _pod_spec(workload)["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints if _selects(c["labelSelector"], _pod_labels(workload))}
    assert "kubernetes.io/hostname" in keys


def _shutdown_budget_s(role: str, env: dict[str, str | None]) -> float:
    """How long the process may take to stop after SIGTERM, from its settings (and env overrides)."""
    settings = SETTINGS[role]
    field = "relay_shutdown_grace_s" if role == "relay" else "grpc_shutdown_grace_s"
    default = settings.model_fields[field].default
    grace = float(env.get(field.upper()) or default)
    return grace + (STOP_MARGIN_S if role == "read" else 0.0)


@pytest.mark.parametrize("role", ["write", "read", "relay", "saga-worker", "payment-provider"])
def test_termination_grace_outlasts_the_drain(rendered: dict[str, list[dict[str, Any]]], role: str):
    objects = rendered["all"]
    workload, container = _main_container(objects, role)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    budget = pre_stop + _shutdown_budget_s(role, _resolve_env(objects, container))
    assert _pod_spec(workload)["terminationGracePeriodSeconds"] > budget
    if role in ("write", "read"):
        assert pre_stop > 0, "endpoints drop the pod before the server stops taking calls"


# --- security -------------------------------------------------------------------------------


def _dockerfile_uid() -> int:
    match = re.search(r"useradd\b.*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile creates its user with a fixed uid"
    return int(match[1])


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_every_pod_runs_non_root_read_only_without_capabilities(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
):
    uid = _dockerfile_uid()
    workloads = [o for o in rendered[overlay] if o["kind"] in WORKLOAD_KINDS]
    assert workloads
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = _pod_spec(workload)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert security["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        ours = any(_role(c) for c in _containers(pod))
        if ours:
            assert (security["runAsUser"], security["runAsGroup"]) == (uid, uid), name
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
            assert context.get("runAsNonRoot", True) is True, where
            assert "privileged" not in context, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"


def test_writable_paths_are_volumes(rendered: dict[str, list[dict[str, Any]]]):
    # The root filesystem is read-only: /tmp, and the provider's books, are mounted.
    for workload, container, role in _ours(rendered["all"]):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{workload['metadata']['name']}/{container['name']}"
        if role == "payment-provider":
            state = _resolve_env(rendered["all"], container)["PAYMENT_STATE_FILE"]
            assert state is not None
            [volume] = [v for v in _pod_spec(workload)["volumes"] if v["name"] == mounts[str(Path(state).parent)]]
            assert "persistentVolumeClaim" in volume, "the books outlive the pod"
            assert workload["spec"]["replicas"] == 1
            assert workload["spec"]["strategy"]["type"] == "Recreate", "one writer of the books at a time"


# --- the migration runs before the services ------------------------------------------------------


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_the_migration_runs_before_any_service_starts(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    objects = rendered[overlay]
    job = _one(objects, "Job", "tessera-migrate")
    [migrate] = _pod_spec(job)["containers"]
    assert _role(migrate) == "migrate"
    assert _pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "a finished Job is removed, so the next apply runs it again"
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "PreSync"
    assert "pre-upgrade" in annotations["helm.sh/hook"]
    job_env = _resolve_env(objects, migrate)
    for workload in _find(objects, "Deployment"):
        pod = _pod_spec(workload)
        roles = {_role(c) for c in pod["containers"]}
        needs_database = any("DATABASE_URL" in _env_sources(c) for c in pod["containers"])
        if not needs_database:
            assert roles <= {None, "payment-provider"}
            continue
        # The first init container applies (or, once the Job has, confirms) the schema: no
        # service process starts against an older one, whatever order the objects are created in.
        first = pod["initContainers"][0]
        assert first["command"] == migrate["command"]
        assert first["image"] == migrate["image"]
        assert _resolve_env(objects, first) == job_env


# --- settings: every variable is one the process reads --------------------------------------------


def _unknown_env(role: str, container: dict[str, Any]) -> set[str]:
    return set(_env_sources(container)) - accepted_env(role)


def test_a_misspelt_variable_is_caught():
    container = {"name": "write", "env": [{"name": "GRPC_PROT", "value": "50051"}, {"name": "GRPC_PORT", "value": "1"}]}
    assert _unknown_env("write", container) == {"GRPC_PROT"}
    # Settings of another process do not count: the relay has no gRPC port.
    assert _unknown_env("relay", {"name": "relay", "env": [{"name": "GRPC_PORT", "value": "1"}]}) == {"GRPC_PORT"}
    # The saga worker's port has an alias.
    assert _unknown_env("saga-worker", {"name": "s", "env": [{"name": "SAGA_WORKER_PORT", "value": "1"}]}) == set()


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_every_variable_is_a_setting_of_its_process(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    for workload, container, role in _ours(rendered[overlay]):
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert _unknown_env(role, container) == set(), f"{where} sets variables {role} does not read"
        # Internal variables of the read worker group are the parent's business.
        assert not {"READ_WORKER_CONTROL_FD", "READ_WORKER_INDEX"} & set(_env_sources(container)), where


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_the_configured_values_are_accepted_by_the_settings(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
):
    for _, container, role in _ours(rendered[overlay]):
        values = _resolve_env(rendered[overlay], container)
        settings = SETTINGS[role]
        for name in accepted_env(role):
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            if value is not None:  # production Secrets are the operator's
                monkeypatch.setenv(name, value)
        settings()
        if role in WITH_METRICS:
            metrics = MetricsSettings()
            if metrics.metrics_port is not None:
                assert metrics.metrics_host == "0.0.0.0", "Prometheus scrapes from another pod"
                assert _port(container, "metrics") == metrics.metrics_port


def test_production_secret_keys_are_documented():
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for key in PRODUCTION_SECRET_KEYS:
        assert f"`{key}`" in doc, key


# --- the same roles, commands and settings as docker-compose.yml -----------------------------------


@pytest.mark.parametrize("role", sorted(MODULES.values()))
def test_roles_match_docker_compose(rendered: dict[str, list[dict[str, Any]]], role: str):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][COMPOSE_SERVICE[role]]
    objects = rendered["all"]
    if role == "migrate":
        container = _pod_spec(_one(objects, "Job", "tessera-migrate"))["containers"][0]
    else:
        _, container = _main_container(objects, role)
    assert container["command"] == compose["command"]
    compose_env = set(compose.get("environment", {}))
    ours = set(_env_sources(container))
    meaningful = compose_env & accepted_env(role)
    assert meaningful <= ours, f"{role}: compose sets {sorted(meaningful - ours)} and the cluster does not"
    assert ours - compose_env <= KUBERNETES_ONLY_ENV, f"{role}: {sorted(ours - compose_env - KUBERNETES_ONLY_ENV)}"
    values = _resolve_env(objects, container)
    for name in ("GRPC_PORT", "REDIS_KEY_PREFIX", "PAYMENT_STATE_FILE"):
        if name in meaningful:
            assert values[name] == str(compose["environment"][name]), name
    # The compose health check probes the port the cluster's probes use.
    if "grpc" in {p["name"] for p in container.get("ports", [])}:
        assert compose["healthcheck"]["test"][-1] == f"127.0.0.1:{_port(container, 'grpc')}"


def test_replica_counts_follow_compose_where_they_are_a_design_choice(rendered: dict[str, list[dict[str, Any]]]):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for overlay in OVERLAYS:
        relay, _ = _main_container(rendered[overlay], "relay")
        assert relay["spec"]["replicas"] == compose["relay"]["deploy"]["replicas"] == 2
    provider, _ = _main_container(rendered["all"], "payment-provider")
    assert provider["spec"]["replicas"] == compose["payment-provider"].get("deploy", {}).get("replicas", 1) == 1


def test_dev_postgres_and_redis_match_compose(rendered: dict[str, list[dict[str, Any]]]):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    objects = rendered["dev"]
    for name in ("postgres", "redis"):
        [container] = _pod_spec(_one(objects, "StatefulSet", name))["containers"]
        assert container["image"] == compose[name]["image"]
    _, write = _main_container(objects, "write")
    assert (_resolve_env(objects, write)["DATABASE_URL"] or "").startswith("postgresql://tessera:")


# --- network policies -------------------------------------------------------------------------------


def _admits(policy: dict[str, Any], labels: dict[str, str], port: int, namespace: dict[str, str] | None = None) -> bool:
    """Whether `policy` lets a pod with `labels` in on `port`; `namespace`: the labels of another namespace."""
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", [{}]):
            if "namespaceSelector" in peer:
                namespace_ok = namespace is not None and _selects(peer["namespaceSelector"], namespace)
            else:
                namespace_ok = namespace is None
            if namespace_ok and _selects(peer.get("podSelector", {}), labels):
                return True
    return False


ELSEWHERE = {"kubernetes.io/metadata.name": "elsewhere"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def _ingress_policies(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p
        for p in _find(objects, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)
    ]


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_ingress_is_closed_by_default(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    deny = [p for p in _find(rendered[overlay], "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1
    assert deny[0]["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny[0]["spec"]


@pytest.mark.parametrize("overlay", RENDERED_NAMES)
def test_callers_reach_the_grpc_services_from_any_namespace(rendered: dict[str, list[dict[str, Any]]], overlay: str):
    objects = rendered[overlay]
    caller = {"app": "some-client"}
    for role in ("write", "read"):
        workload, container = _main_container(objects, role)
        policies = _ingress_policies(objects, _pod_labels(workload))
        assert any(_admits(p, caller, _port(container, "grpc"), namespace=ELSEWHERE) for p in policies), role
    for role in ("relay", "saga-worker"):
        workload, container = _main_container(objects, role)
        ports = [p["containerPort"] for p in container.get("ports", []) if p["name"] != "metrics"]
        policies = _ingress_policies(objects, _pod_labels(workload))
        assert not any(_admits(p, caller, port, namespace=ELSEWHERE) for p in policies for port in ports), role


def _labels_of_roles_setting(
    objects: list[dict[str, Any]], variable: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Pod labels of our workloads that set `variable`, and of those that do not."""
    using: list[dict[str, str]] = []
    others: list[dict[str, str]] = []
    for workload in objects:
        if workload["kind"] in WORKLOAD_KINDS and any(_role(c) for c in _containers(_pod_spec(workload))):
            sets = any(variable in _env_sources(c) for c in _containers(_pod_spec(workload)))
            (using if sets else others).append(_pod_labels(workload))
    return using, others


@pytest.mark.parametrize(
    ("server", "port", "variable"),
    [("postgres", 5432, "DATABASE_URL"), ("redis", 6379, "REDIS_URL")],
)
def test_only_the_processes_that_use_a_dev_server_may_reach_it(
    rendered: dict[str, list[dict[str, Any]]], server: str, port: int, variable: str
):
    objects = rendered["dev"]
    server_labels = _pod_labels(_one(objects, "StatefulSet", server))
    policies = _ingress_policies(objects, server_labels)
    using, others = _labels_of_roles_setting(objects, variable)
    assert using and others
    for labels in using:
        assert any(_admits(p, labels, port) for p in policies), f"{labels} cannot reach {server}"
    for labels in others:
        assert not any(_admits(p, labels, port) for p in policies), f"{labels} may reach {server}"
    assert not any(_admits(p, {"app": "stranger"}, port, namespace=ELSEWHERE) for p in policies)


def test_only_saga_workers_reach_the_payment_provider(rendered: dict[str, list[dict[str, Any]]]):
    objects = rendered["all"]
    workload, container = _main_container(objects, "payment-provider")
    policies = _ingress_policies(objects, _pod_labels(workload))
    using, others = _labels_of_roles_setting(objects, "PAYMENT_PROVIDER_ADDRESS")
    port = _port(container, "grpc")
    assert all(any(_admits(p, labels, port) for p in policies) for labels in using)
    assert not any(_admits(p, labels, port) for p in policies for labels in others)
    _, saga = _main_container(objects, "saga-worker")
    service = _one(objects, "Service", "tessera-payment-provider")
    address = _resolve_env(objects, saga)["PAYMENT_PROVIDER_ADDRESS"]
    assert address == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


# --- monitoring: the operator's custom resources ------------------------------------------------------

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_METRIC = re.compile(r"\b(tessera_[a-z0-9_]+|rpc_server_[a-z0-9_]+)\b")
_INSTRUMENT = re.compile(r"create_(?:observable_)?(?:counter|up_down_counter|gauge|histogram)\(\s*\"([a-z0-9_.]+)\"")
_SUFFIXES = ("", "_total", "_seconds", "_bucket", "_count", "_sum", "_seconds_bucket", "_seconds_count", "_seconds_sum")
_SOURCES = ("shared_kernel", "write_service", "read_service", "relay")


def exported_metric_bases() -> set[str]:
    """Prometheus names (before unit and type suffixes) of every instrument the services create."""
    names = set()
    for package in _SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            names |= {name.replace(".", "_") for name in _INSTRUMENT.findall(path.read_text())}
    return names


def _is_exported(metric: str, bases: set[str]) -> bool:
    return any(metric == base + suffix for base in bases for suffix in _SUFFIXES)


def test_the_exported_metric_names_are_found():
    bases = exported_metric_bases()
    for known in ("tessera_relay_backlog", "tessera_read_projection_lag_seconds", "rpc_server_duration"):
        assert known in bases
    assert _is_exported("rpc_server_duration_seconds_count", bases)
    assert _is_exported("tessera_read_projection_parked_events_total", bases)
    assert not _is_exported("tessera_read_projection_lag", bases)
    assert not _is_exported("tessera_relay_backlogg", bases)


def test_pod_monitor_scrapes_every_process_with_an_endpoint(rendered: dict[str, list[dict[str, Any]]]):
    objects = rendered["production"]
    [monitor] = _find(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [config] = _find(objects, "ConfigMap")
    metrics_port = int(config["data"]["METRICS_PORT"])
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert _DURATION.match(endpoint["interval"])
    scraped = set()
    for workload in _find(objects, "Deployment"):
        labels = _pod_labels(workload)
        [container] = _pod_spec(workload)["containers"]
        role = _role(container)
        if _selects(monitor["spec"]["selector"], labels):
            scraped.add(role)
            assert _port(container, endpoint["port"]) == metrics_port
            assert "METRICS_PORT" in _env_sources(container)
            policies = _ingress_policies(objects, labels)
            prometheus = {"app.kubernetes.io/name": "prometheus"}
            assert any(_admits(p, prometheus, metrics_port, MONITORING) for p in policies), role
            assert not any(_admits(p, prometheus, metrics_port, ELSEWHERE) for p in policies), role
    assert scraped == WITH_METRICS


def test_prometheus_rules_are_well_formed_and_use_exported_metrics(rendered: dict[str, list[dict[str, Any]]]):
    [rule_set] = _find(rendered["production"], "PrometheusRule")
    assert rule_set["apiVersion"] == "monitoring.coreos.com/v1"
    bases = exported_metric_bases()
    alerts = []
    for group in rule_set["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Tessera[A-Z][A-Za-z]+", rule["alert"])
            alerts.append(rule["alert"])
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), rule["alert"]
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            for metric in _METRIC.findall(expr):
                assert _is_exported(metric, bases), f"{rule['alert']}: no service exports {metric}"
    assert len(alerts) == len(set(alerts))
    text = yaml.safe_dump(rule_set)
    # What operators watch: projection lag, relay backlog, parked events, error rate.
    for metric in (
        "tessera_read_projection_lag_seconds",
        "tessera_relay_backlog",
        "tessera_read_projection_parked",
        "rpc_server_duration_seconds_count",
    ):
        assert metric in text, metric
