"""The container setup, checked without a Docker engine: docker-compose.yml, Dockerfile, .dockerignore."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared_kernel.platform.healthcheck import main as healthcheck_main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# Our services and the module each runs; the rest of the compose file is Postgres and Redis.
OURS = {
    "migrate": "write_service.migrate",
    "write": "write_service",
    "relay": "relay",
    "read": "read_service",
    "saga-worker": "write_service.saga",
    "payment-provider": "payment_provider",
}
ONE_SHOT = {"migrate"}
# Stands in for an external system: it needs neither Postgres nor Redis.
EXTERNAL = {"payment-provider"}
# Started only with `--profile observability`; their images have no shell to probe health with,
# except Prometheus.
OBSERVABILITY = {"otel-collector", "jaeger", "prometheus"}


def _env(service: str) -> dict[str, Any]:
    environment = SERVICES[service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: environment should be a mapping"
    return environment


def _healthcheck_argv(service: str) -> list[str]:
    test = SERVICES[service]["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    assert test[0] in ("CMD", "CMD-SHELL"), f"{service}: healthcheck test must start with CMD or CMD-SHELL"
    return shlex.split(test[1]) if test[0] == "CMD-SHELL" else list(test[1:])


def _module_file(module: str) -> Path | None:
    """The file `python -m module` runs from the repository, if it exists."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__main__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _interpolate(value: Any, env: dict[str, str] | None = None) -> str:
    """A compose value with `${NAME}` and `${NAME:-default}` replaced as compose would, given `env`."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}", one, str(value))


def _published(service: str, env: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(host address, host port or range, container port) of each published port."""
    mappings = []
    for mapping in SERVICES[service].get("ports", []):
        parts = _interpolate(mapping, env).rsplit(":", 2)
        host = parts[0] if len(parts) == 3 else ""  # no address: every interface
        mappings.append((host, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return mappings


def _depends(service: str) -> dict[str, str]:
    depends = SERVICES[service].get("depends_on", {})
    assert isinstance(depends, dict), f"{service}: depends_on should name a condition for each dependency"
    return {name: spec["condition"] for name, spec in depends.items()}


def test_topology():
    assert set(SERVICES) == {"postgres", "redis", *OURS, *OBSERVABILITY}
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert SERVICES["relay"]["deploy"]["replicas"] == 2  # one active, one standby
    assert SERVICES["read"]["deploy"]["replicas"] >= 2
    assert SERVICES["saga-worker"]["deploy"]["replicas"] >= 1
    assert SERVICES["payment-provider"].get("deploy", {}).get("replicas", 1) == 1  # one set of books
    for name, service in SERVICES.items():
        if service.get("deploy", {}).get("replicas", 1) > 1:
            assert "container_name" not in service, f"{name}: a fixed container name cannot be replicated"


def test_the_image_is_built_once_and_every_service_of_ours_runs_it():
    builders = [name for name, service in SERVICES.items() if "build" in service]
    # Six services with the same `build:` meant six identical builds, in parallel.
    assert builders == ["migrate"], "exactly one service builds the image"
    assert "build" not in COMPOSE["x-app"], "the shared fragment would give every service a build"
    build = SERVICES["migrate"]["build"]
    assert build["context"] == "."
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert _interpolate(build["network"]) == "default"
    assert _interpolate(build["network"], {"TESSERA_BUILD_NETWORK": "host"}) == "host"
    images = {SERVICES[name]["image"] for name in OURS}
    assert images == {SERVICES["migrate"]["image"]}, "one image for every role"
    # Every other service waits for the one that builds, directly or through a chain, except the
    # payment provider, which stands for an external system; `up` builds before it starts any.
    assert all(name in EXTERNAL or "migrate" in _depends(name) or name == "migrate" for name in OURS)


@pytest.mark.parametrize(("service", "module"), sorted(OURS.items()))
def test_commands_run_real_modules(service: str, module: str):
    command = SERVICES[service]["command"]
    assert command == ["python", "-m", module]
    assert _module_file(module) is not None, f"`python -m {module}` has nothing to run in the repository"


def test_dependencies_wait_for_health_and_for_migrations():
    assert _depends("migrate") == {"postgres": "service_healthy"}
    assert _depends("write") == {"postgres": "service_healthy", "migrate": "service_completed_successfully"}
    for service in ("relay", "read"):
        assert _depends(service) == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "migrate": "service_completed_successfully",
        }
    assert _depends("saga-worker") == {
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
        "payment-provider": "service_healthy",
    }
    assert _depends("payment-provider") == {}
    for name in SERVICES:
        for dependency, condition in _depends(name).items():
            assert dependency in SERVICES
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{name} waits for {dependency}'s health check"
            if condition == "service_completed_successfully":
                assert dependency in ONE_SHOT


def test_every_long_running_service_has_a_health_check():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} runs once and must not be restarted"
            continue
        if name in OBSERVABILITY - {"prometheus"}:
            continue
        assert "healthcheck" in service, f"{name} has no health check"
        assert service["healthcheck"].get("interval"), f"{name}: health check without an interval"
    assert "pg_isready" in _healthcheck_argv("postgres")
    assert _healthcheck_argv("redis") == ["redis-cli", "ping"]


@pytest.mark.parametrize(("service", "port"), [("write", 50051), ("read", 50052), ("payment-provider", 50070)])
def test_grpc_services_listen_publish_and_probe_the_same_port(service: str, port: int):
    assert int(_env(service)["GRPC_PORT"]) == port
    assert [target for _, _, target in _published(service)] == [str(port)]
    argv = _healthcheck_argv(service)
    assert argv[:3] == ["python", "-m", "shared_kernel.platform.healthcheck"]
    assert argv[3] == f"127.0.0.1:{port}"


def test_saga_workers_probe_their_health_port_and_reach_the_provider_by_its_port():
    env = _env("saga-worker")
    argv = _healthcheck_argv("saga-worker")
    assert argv[:3] == ["python", "-m", "shared_kernel.platform.healthcheck"]
    assert argv[3] == f"127.0.0.1:{int(env['GRPC_PORT'])}"
    assert "ports" not in SERVICES["saga-worker"], "replicas with health only publish nothing"
    host, _, port = str(env["PAYMENT_PROVIDER_ADDRESS"]).partition(":")
    assert host == "payment-provider"
    assert int(port) == int(_env("payment-provider")["GRPC_PORT"])


def test_payment_provider_keeps_its_books_in_a_volume_it_may_write():
    state = Path(str(_env("payment-provider")["PAYMENT_STATE_FILE"]))
    volumes = [str(volume) for volume in SERVICES["payment-provider"]["volumes"]]
    mounted = [volume.split(":", 1) for volume in volumes]
    assert any(name in COMPOSE["volumes"] and state.parent == Path(target) for name, target in mounted)
    # The image runs as a non-root user: the directory must exist in the image, owned by that user,
    # so the named volume starts out writable.
    runs = " ".join(rest for keyword, rest in _final_stage() if keyword == "RUN")
    assert f"mkdir -p {state.parent}" in runs
    assert "chown" in runs


def test_payment_provider_failure_settings_are_passed_from_the_host():
    env = _env("payment-provider")
    for name in (
        "PAYMENT_LATENCY_MS",
        "PAYMENT_DECLINE_RATE",
        "PAYMENT_TIMEOUT_RATE",
        "PAYMENT_UNAVAILABLE_RATE",
        "PAYMENT_DECLINE_ABOVE_MINOR",
        "PAYMENT_SEED",
    ):
        assert re.fullmatch(rf"\$\{{{name}:-[0-9.]+\}}", str(env[name])), name


def test_read_replicas_each_get_a_host_port():
    [(_, published, target)] = _published("read")
    match = re.fullmatch(r"(\d+)-(\d+)", published)
    assert match, "a range of host ports, one per replica"
    assert target == "50052"
    first, last = int(match[1]), int(match[2])
    assert last - first + 1 >= SERVICES["read"]["deploy"]["replicas"]
    [(_, moved, _)] = _published("read", {"TESSERA_READ_PORTS": "21000-21002"})
    assert moved == "21000-21002", "the range may be moved, e.g. to free ports"


def test_published_ports_bind_to_loopback_unless_told_otherwise():
    published = {name: _published(name) for name in SERVICES if "ports" in SERVICES[name]}
    assert set(published) == {"write", "read", "payment-provider", "jaeger", "prometheus"}
    for name, mappings in published.items():
        for host, port, _ in mappings:
            assert host == "127.0.0.1", f"{name} publishes {port} on {host or 'every interface'}"
        for host, _, _ in _published(name, {"TESSERA_HOST_ADDRESS": "0.0.0.0"}):
            assert host == "0.0.0.0", f"{name}: TESSERA_HOST_ADDRESS must choose the address"
    for name, variable in (
        ("write", "TESSERA_WRITE_PORT"),
        ("payment-provider", "TESSERA_PAYMENT_PORT"),
        ("jaeger", "TESSERA_JAEGER_PORT"),
        ("prometheus", "TESSERA_PROMETHEUS_PORT"),
    ):
        [(_, port, _)] = _published(name, {variable: "21234"})
        assert port == "21234", f"{variable} moves {name}'s host port"


def test_documented_compose_run_commands_start_nothing_else():
    """`compose run` without --no-deps starts the dependencies again, the migration included."""
    documented = [
        line
        for text in ((ROOT / "docker-compose.yml").read_text(), (ROOT / "README.md").read_text())
        for line in text.splitlines()
        if re.search(r"compose run\b", line)
    ]
    assert documented, "the token command is documented"
    for line in documented:
        assert "--no-deps" in line, line


def test_read_replicas_run_a_worker_group_that_stops_within_the_stop_grace_period():
    from read_service.settings import ReadServiceSettings
    from read_service.workers import STOP_MARGIN_S

    workers = str(_env("read")["READ_WORKERS"])
    match = re.fullmatch(r"\$\{READ_WORKERS:-(\d+)\}", workers)
    assert match, "READ_WORKERS may be set from the host, with a default"
    assert ReadServiceSettings(read_workers=int(match[1])).read_workers >= 2
    # The parent gives its workers their drain period plus a margin before it kills them; compose
    # must wait longer than that before it kills the parent.
    grace = ReadServiceSettings.model_fields["grpc_shutdown_grace_s"].default
    stop_grace = SERVICES["read"].get("stop_grace_period", COMPOSE["x-app"]["stop_grace_period"])
    assert float(str(stop_grace).removesuffix("s")) > grace + STOP_MARGIN_S
    assert SERVICES["read"]["init"] is True, "an init process passes SIGTERM on to the group's parent"


def test_read_replicas_sharing_one_redis_apply_under_the_lease_by_default():
    from read_service.lease import ApplyMode
    from read_service.settings import ReadServiceSettings

    mode = str(_env("read")["READ_APPLY_MODE"])
    match = re.fullmatch(r"\$\{READ_APPLY_MODE:-(\w+)\}", mode)
    assert match, "READ_APPLY_MODE may be set from the host, with a default"
    assert ApplyMode(match[1]) is ApplyMode.LEASE
    assert ReadServiceSettings().read_apply_mode is ApplyMode.LEASE


def test_relay_health_check_reaches_the_servers_it_works_between():
    argv = _healthcheck_argv("relay")
    assert argv[:3] == ["python", "-m", "shared_kernel.platform.healthcheck"]
    reached = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--reach-env"]
    assert sorted(reached) == ["DATABASE_URL", "REDIS_URL"]


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {"postgres", "redis", *ONE_SHOT, *OBSERVABILITY}))
def test_health_check_commands_parse(service: str, monkeypatch: pytest.MonkeyPatch):
    argv = _healthcheck_argv(service)
    for name, value in _env(service).items():
        monkeypatch.setenv(name, str(value or ""))
    # Nothing of the compose network exists here: the probe must answer "unhealthy", not misuse.
    assert healthcheck_main([*argv[3:], "--timeout", "0.2"]) in (0, 1)


def test_environment_points_at_the_compose_servers():
    postgres_env = SERVICES["postgres"]["environment"]
    for service in set(OURS) - EXTERNAL:
        env = _env(service)
        database = urlsplit(env["DATABASE_URL"])
        assert database.hostname == "postgres"
        assert database.username == postgres_env["POSTGRES_USER"]
        assert database.password == postgres_env["POSTGRES_PASSWORD"]
        assert database.path == "/" + postgres_env["POSTGRES_DB"]
        if service != "migrate":
            assert env.get("REDIS_URL", "redis://redis:6379/0").startswith("redis://redis:")
    for service in ("relay", "read"):
        assert urlsplit(_env(service)["REDIS_URL"]).hostname == "redis"
        assert _env(service)["REDIS_KEY_PREFIX"] == _env("relay")["REDIS_KEY_PREFIX"]


# --- the `observability` profile ------------------------------------------------------


def test_observability_services_run_only_in_their_profile():
    for name, service in SERVICES.items():
        profiles = service.get("profiles", [])
        assert profiles == (["observability"] if name in OBSERVABILITY else []), name
        for dependency in _depends(name):
            # A service outside the profile may not need one inside it: `docker compose up` would fail.
            assert name in OBSERVABILITY or dependency not in OBSERVABILITY, f"{name} depends on {dependency}"
    assert SERVICES["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert SERVICES["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert SERVICES["prometheus"]["image"].startswith("prom/prometheus:")
    assert _published("jaeger") == [("127.0.0.1", "16686", "16686")]
    assert _published("prometheus") == [("127.0.0.1", "9090", "9090")]


def test_services_export_to_the_collector_only_when_asked_to():
    for service in set(OURS) - EXTERNAL:
        env = _env(service)
        assert env["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"
        assert env["OTEL_METRICS_EXPORTER"] == "${OTEL_METRICS_EXPORTER:-none}"
        endpoint = re.fullmatch(r"\$\{OTEL_EXPORTER_OTLP_ENDPOINT:-(.+)\}", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint, "the endpoint may be set from the host, with a default"
        assert urlsplit(endpoint[1]).hostname == "otel-collector"
        assert urlsplit(endpoint[1]).port == 4317


def _mounted_config(service: str, target: str) -> dict[str, Any]:
    """The YAML file the service mounts (read-only) at `target`, parsed."""
    for volume in SERVICES[service]["volumes"]:
        source, mounted, *mode = str(volume).split(":")
        if mounted == target:
            assert mode == ["ro"], f"{service}: mount its config read-only"
            path = (ROOT / source).resolve()
            assert path.is_relative_to(ROOT / "deploy" / "observability")
            config: dict[str, Any] = yaml.safe_load(path.read_text())
            return config
    raise AssertionError(f"{service} mounts nothing at {target}")


def test_collector_receives_otlp_and_feeds_jaeger_and_prometheus():
    command = SERVICES["otel-collector"]["command"]
    assert command == ["--config=/etc/otelcol-contrib/config.yaml"]
    config = _mounted_config("otel-collector", "/etc/otelcol-contrib/config.yaml")
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert pipelines["metrics"]["receivers"] == ["otlp"]
    for pipeline in pipelines.values():
        for part in ("processors", "exporters"):
            for name in pipeline[part]:
                assert name in config[part], f"{name} is used but not configured"
    [traces_exporter] = pipelines["traces"]["exporters"]
    assert config["exporters"][traces_exporter]["endpoint"] == "jaeger:4317"
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    [metrics_exporter] = pipelines["metrics"]["exporters"]
    collector_port = config["exporters"][metrics_exporter]["endpoint"].rsplit(":", 1)[1]

    prometheus = _mounted_config("prometheus", "/etc/prometheus/prometheus.yml")
    assert SERVICES["prometheus"]["command"] == ["--config.file=/etc/prometheus/prometheus.yml"]
    targets = [t for job in prometheus["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert f"otel-collector:{collector_port}" in targets


# --- Dockerfile and .dockerignore -------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    pairs = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_needs_no_frontend_from_a_registry():
    # A `# syntax=` directive makes BuildKit fetch that frontend image first, which fails offline.
    first = DOCKERFILE.lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first


def _stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the stage `FROM … AS name`."""
    instructions = _instructions()
    start = next(
        i for i, (kw, rest) in enumerate(instructions) if kw == "FROM" and rest.upper().endswith(f" AS {name.upper()}")
    )
    end = next((i for i in range(start + 1, len(instructions)) if instructions[i][0] == "FROM"), len(instructions))
    return instructions[start:end]


@pytest.mark.parametrize(("stage", "lock"), [("deps", "requirements.lock"), ("codegen", "requirements-codegen.lock")])
def test_dockerfile_installs_exactly_the_hashed_lock(stage: str, lock: str):
    """The image runs what CI tested: each stage installs its lock, hashes checked, nothing resolved."""
    runs = [rest for keyword, rest in _stage(stage) if keyword == "RUN" and "pip install" in rest]
    assert runs == [f"pip install --require-hashes --no-deps -r {lock}"]
    copies = [rest for keyword, rest in _stage(stage) if keyword == "COPY"]
    assert f"{lock} ./" in copies
    assert "--hash=sha256:" in (ROOT / lock).read_text()
    assert "pyproject.toml" not in DOCKERFILE, "dependencies come from the locks, not from the ranges"


def test_dockerfile_builds_from_python_311_slim():
    stages = {rest.split()[-1] for keyword, rest in _instructions() if keyword == "FROM" and " AS " in rest.upper()}
    for keyword, rest in _instructions():
        if keyword == "FROM":
            base = rest.split()[0]
            assert base == "python:3.11-slim" or base in stages, base


def test_dockerfile_runs_the_codegen_and_ships_its_output():
    runs = [rest for keyword, rest in _instructions() if keyword == "RUN"]
    assert any("scripts/gen_protos.py" in run for run in runs), "the image must generate the tessera package"
    final_copies = [rest for keyword, rest in _final_stage() if keyword == "COPY"]
    assert any("--from=codegen" in copy and "tessera" in copy for copy in final_copies)


def test_dockerfile_runs_as_a_non_root_user():
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the final stage must switch to an unprivileged user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerignore_keeps_local_state_and_generated_code_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".stack", "tessera"} <= ignored
    for needed in ("devstack", "migrations", "protos", "scripts", *{m.split(".")[0] for m in OURS.values()}):
        assert needed not in ignored, f"{needed}/ is needed in the image"
