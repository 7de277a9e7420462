"""Keeps docker-compose.yml, the services' Dockerfiles and deploy/prometheus.yml honest without
Docker: every service is built from its own Dockerfile, every IMGEST_* variable is a real setting
(pydantic-settings ignores unknown ones, so a typo would silently fall back to a default), ports
agree everywhere, start order waits on health, and infrastructure images are pinned.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
PREFIX = "IMGEST_"

SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))


# --- helpers -------------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_services() -> dict[str, dict]:
    return compose()["services"]


def svc(name: str) -> dict:
    services = compose_services()
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def environment(service: dict) -> dict[str, object]:
    """A compose `environment:` as a mapping (it may be a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {key: value for key, value in pairs}
    return dict(env)


def depends_on(service: dict) -> dict[str, str]:
    """`depends_on:` as {service: condition} (the short list form means `service_started`)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {dep: "service_started" for dep in deps}
    return {dep: (spec or {}).get("condition", "service_started") for dep, spec in deps.items()}


def healthcheck_command(service: dict) -> str:
    check = service.get("healthcheck") or {}
    test = check.get("test")
    if check.get("disable") or not test or test == ["NONE"]:
        return ""
    return " ".join(test) if isinstance(test, list) else str(test)


def container_ports(service: dict) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        target = entry.get("target") if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def published(service: dict, container_port: int) -> int | None:
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if int(entry["target"]) == container_port and entry.get("published"):
                return int(entry["published"])
            continue
        parts = str(entry).split("/")[0].split(":")
        if int(parts[-1]) == container_port and len(parts) >= 2:
            return int(parts[-2])
    return None


def services_with_image(fragment: str) -> list[str]:
    return [name for name, s in compose_services().items() if fragment in s.get("image", "")]


@cache
def settings_class(name: str):
    return importlib.import_module(f"imgest_{name}.settings").Settings


def known_variables(name: str) -> set[str]:
    """Every variable the service's Settings reads: prefix + field name, upper-cased
    (RuntimeSettings' fields come with it through inheritance)."""
    cls = settings_class(name)
    prefix = cls.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper() for field in cls.model_fields}


def port_variable(name: str) -> str:
    return f"{PREFIX}{name.upper()}_PORT"


def compose_port(name: str) -> int:
    value = environment(svc(name)).get(port_variable(name))
    assert value is not None, f"{name}: {port_variable(name)} is not set in docker-compose.yml"
    return int(value)


def store_users() -> list[str]:
    """Services that open the object store: all but those built with `uses_store=False`."""
    pattern = re.compile(r"uses_store\s*=\s*False")
    return [name for name in SERVICES
            if not any(pattern.search(p.read_text())
                       for p in (ROOT / "services" / name / "src").rglob("*.py"))]


@cache
def dockerfile(name: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), grouped by build stage."""
    text = (ROOT / "services" / name / "Dockerfile").read_text()
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        assert stages, f"services/{name}/Dockerfile: {keyword} before the first FROM"
        stages[-1].append((keyword, args.strip()))
    return stages


def instructions(name: str, keyword: str, stage: int | None = None) -> list[str]:
    stages = dockerfile(name) if stage is None else [dockerfile(name)[stage]]
    return [args for instrs in stages for kw, args in instrs if kw == keyword]


def dockerfile_env(name: str, stage: int = -1) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(name, "ENV", stage):
        words = shlex.split(args)
        if words and "=" not in words[0]:  # legacy form: ENV KEY value
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(word.split("=", 1) for word in words)
    return env


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT arguments as a list (exec form, or shell form split like sh would)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return shlex.split(args)
    assert isinstance(value, list), args
    return value


def healthz_ports(command: str) -> set[int]:
    return {int(p) for p in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)/healthz", command)}


@cache
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


# --- every service: built from its own Dockerfile ------------------------------------------------


def test_services_are_discovered():
    assert {"gateway", "unpacker", "metadata", "importer", "notifier"} <= set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_built_from_its_own_dockerfile(name):
    build = svc(name).get("build")
    assert isinstance(build, dict), f"{name}: `build:` needs context and dockerfile"
    assert (ROOT / build.get("context", ".")).resolve() == ROOT, \
        f"{name}: the build context must be the repository root (a uv workspace)"
    assert Path(build.get("dockerfile", "Dockerfile")) == Path("services") / name / "Dockerfile"
    assert (ROOT / "services" / name / "Dockerfile").is_file()


def test_every_built_service_is_an_imgest_service_with_an_existing_dockerfile():
    for name, service in compose_services().items():
        if "build" not in service:
            continue
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        path = context / ("Dockerfile" if isinstance(build, str)
                          else build.get("dockerfile", "Dockerfile"))
        assert path.is_file(), f"{name}: {path} does not exist"
        assert name in SERVICES, f"{name} is built here but is not a service in services/"


# --- environment: only known settings, with valid values -----------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_compose_environment_is_known_settings(name):
    env = environment(svc(name))
    assert env, f"{name}: no environment in docker-compose.yml"
    unknown = sorted(k for k in env if k.upper().startswith(PREFIX)
                     and k.upper() not in known_variables(name))
    assert not unknown, (f"{name}: {unknown} are not settings of imgest_{name}.settings.Settings "
                         f"(known: {sorted(known_variables(name))})")


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_environment_is_known_settings(name):
    env = {k: v for stage in range(len(dockerfile(name)))
           for k, v in dockerfile_env(name, stage).items()}
    unknown = sorted(k for k in env if k.upper().startswith(PREFIX)
                     and k.upper() not in known_variables(name))
    assert not unknown, f"services/{name}/Dockerfile sets unknown settings {unknown}"


@pytest.mark.parametrize("name", SERVICES)
def test_container_environment_validates_as_settings(name, monkeypatch):
    """Dockerfile ENV, overridden by compose, must be accepted by Settings (types, literals)."""
    env = {k: v for k, v in dockerfile_env(name).items() if k.startswith(PREFIX)}
    for key, value in environment(svc(name)).items():
        assert not isinstance(value, bool), \
            f"{name}: {key}: quote booleans in `environment:` (compose wants strings)"
        if value is not None:
            env[key] = str(value)
    for key in [k for k in os.environ if k.upper().startswith(PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_class(name)(_env_file=None)
    assert settings.http_host == "0.0.0.0", f"{name} must listen on all interfaces in a container"
    assert getattr(settings, f"{name}_port") == compose_port(name)


# --- ports agree: compose env, healthchecks, EXPOSE, published ports, Prometheus -----------------


@pytest.mark.parametrize("name", SERVICES)
def test_port_variable_is_a_setting(name):
    assert port_variable(name) in known_variables(name)


@pytest.mark.parametrize("name", SERVICES)
def test_ports_agree(name):
    port = compose_port(name)
    service = svc(name)
    assert healthz_ports(healthcheck_command(service)) == {port}, \
        f"{name}: the compose healthcheck must hit /healthz on {port}"
    if service.get("ports"):
        assert container_ports(service) == {port}, f"{name}: ports must map container port {port}"
    expose = {int(p.split("/")[0]) for args in instructions(name, "EXPOSE", -1)
              for p in args.split()}
    assert expose == {port}, f"services/{name}/Dockerfile must EXPOSE {port}"
    image_default = dockerfile_env(name).get(port_variable(name))
    if image_default is not None:
        assert int(image_default) == port, f"services/{name}/Dockerfile: {port_variable(name)}"
    targets = [t for job in prometheus()["scrape_configs"] if job["job_name"] == name
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets == [f"{name}:{port}"], \
        f"deploy/prometheus.yml: job {name} must scrape {name}:{port}"


def test_gateway_is_published_where_public_url_points():
    gateway = svc("gateway")
    port = compose_port("gateway")
    host_port = published(gateway, port)
    assert host_port is not None, "the gateway's port must be published"
    public = urlsplit(str(environment(gateway)[f"{PREFIX}PUBLIC_URL"]))
    assert public.port == host_port
    for name in SERVICES:
        value = environment(svc(name)).get(f"{PREFIX}PUBLIC_URL")
        assert value in (None, environment(gateway)[f"{PREFIX}PUBLIC_URL"]), \
            f"{name}: IMGEST_PUBLIC_URL differs from the gateway's"


# --- start order and health ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_healthcheck(name):
    assert "/healthz" in healthcheck_command(svc(name)), f"{name}: no /healthz healthcheck"


@pytest.mark.parametrize("name", SERVICES)
def test_service_waits_for_its_infrastructure(name):
    deps = depends_on(svc(name))
    kafka = services_with_image("kafka")
    postgres = services_with_image("postgres")
    assert kafka and postgres
    for dep in (*kafka, *postgres):
        assert deps.get(dep) == "service_healthy", f"{name} must wait for {dep} to be healthy"
    if name in store_users():
        assert deps.get("minio-init") == "service_completed_successfully", \
            f"{name} uses the store: it must wait for minio-init (the bucket)"


def test_dependency_conditions_are_satisfiable():
    services = compose_services()
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert condition in {"service_started", "service_healthy",
                                 "service_completed_successfully"}, (name, dep, condition)
            if condition == "service_healthy":
                assert healthcheck_command(services[dep]), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") in ("no", "on-failure"), \
                    f"{dep} is a one-shot job: it must not be restarted"


def test_infrastructure_has_healthchecks():
    for fragment in ("kafka", "minio/minio", "postgres", "mailpit", "prometheus"):
        names = services_with_image(fragment)
        assert names, f"no {fragment} service in docker-compose.yml"
        for name in names:
            assert healthcheck_command(svc(name)), f"{name} ({fragment}) has no healthcheck"


def test_infrastructure_images_are_pinned():
    for name, service in compose_services().items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name}: neither image nor build"
            continue
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: image {image} has no tag"
        assert last.rsplit(":", 1)[1] != "latest", f"{name}: image {image} is not pinned"


# --- the infrastructure matches what the services are told ---------------------------------------


def buckets_created() -> set[str]:
    """Buckets the one-shot minio-init makes (`mc mb [flags] alias/bucket`), its variables
    expanded."""
    init = svc("minio-init")
    env = {k: str(v) for k, v in environment(init).items() if v is not None}
    command = init.get("command") or []
    script = "\n".join(command) if isinstance(command, list) else str(command)
    script = re.sub(r"\$\$?\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), script)
    return {bucket for line in script.splitlines()
            for words in [shlex.split(line)] if "mb" in words
            for word in words[words.index("mb") + 1:] if not word.startswith("-")
            for bucket in [word.split("/", 1)[1]] if "/" in word}


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("name", SERVICES)
def test_kafka_bootstrap_is_advertised(name):
    bootstrap = str(environment(svc(name))[f"{PREFIX}KAFKA_BOOTSTRAP"])
    for server in bootstrap.split(","):
        host, port = _hostport(server.strip())
        kafka = svc(host)
        advertised = [str(v) for k, v in environment(kafka).items()
                      if k.endswith("ADVERTISED_LISTENERS")]
        assert any(f"//{host}:{port}" in v for v in advertised), \
            f"{name}: Kafka does not advertise {host}:{port} ({advertised})"


@pytest.mark.parametrize("name", SERVICES)
def test_database_url_matches_postgres(name):
    url = make_url(str(environment(svc(name))[f"{PREFIX}DATABASE_URL"]))
    assert url.drivername == "postgresql+asyncpg"
    postgres = svc(url.host)
    assert "postgres" in postgres.get("image", "")
    env = environment(postgres)
    assert url.username == env.get("POSTGRES_USER", "postgres")
    assert url.password == env.get("POSTGRES_PASSWORD")
    assert url.database == env.get("POSTGRES_DB", url.username)
    assert (url.port or 5432) == 5432


@pytest.mark.parametrize("name", SERVICES)
def test_store_settings_match_minio(name):
    env = environment(svc(name))
    if name not in store_users():
        return
    assert env.get(f"{PREFIX}STORE") == "s3", f"{name} uses the store: IMGEST_STORE=s3"
    host, port = _hostport(str(env[f"{PREFIX}S3_ENDPOINT"]))
    minio = svc(host)
    assert "minio/minio" in minio.get("image", "")
    minio_env = environment(minio)
    assert env[f"{PREFIX}S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"]
    assert env[f"{PREFIX}S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert port == 9000
    assert env[f"{PREFIX}S3_BUCKET"] in buckets_created(), \
        "minio-init must create the bucket the services use"


def test_notifier_sends_to_mailpit():
    env = environment(svc("notifier"))
    url = urlsplit(str(env[f"{PREFIX}SMTP_URL"]))
    assert url.scheme in ("smtp", "smtps")
    assert "mailpit" in svc(url.hostname).get("image", "")
    assert url.port == 1025


# --- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_runs_the_service(name):
    cmd = instructions(name, "CMD", -1)
    assert cmd, f"services/{name}/Dockerfile has no CMD in its final stage"
    entrypoint = instructions(name, "ENTRYPOINT", -1)
    argv = (exec_form(entrypoint[-1]) if entrypoint else []) + exec_form(cmd[-1])
    assert f"imgest_{name}" in argv, f"services/{name}/Dockerfile: CMD {argv} does not run it"
    assert argv[argv.index(f"imgest_{name}") - 1] == "-m"


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_builds_only_its_package(name):
    bases = instructions(name, "FROM")
    assert bases and all(b.split()[0] == "python:3.11-slim" for b in bases), bases
    runs = " ".join(instructions(name, "RUN"))
    assert re.search(rf"uv sync\b[^&;]*--frozen[^&;]*--package[ =]imgest-{name}\b", runs) or \
        re.search(rf"uv sync\b[^&;]*--package[ =]imgest-{name}\b[^&;]*--frozen", runs), \
        f"services/{name}/Dockerfile must `uv sync --frozen --package imgest-{name}`"
    assert "--no-dev" in runs


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_runs_as_non_root_with_healthcheck(name):
    users = instructions(name, "USER", -1)
    assert users, f"services/{name}/Dockerfile: no USER in the final stage (runs as root)"
    assert users[-1].split(":")[0] not in ("root", "0")
    health = instructions(name, "HEALTHCHECK", -1)
    assert health and "/healthz" in health[-1] and "urllib" in health[-1]
    assert dockerfile_env(name).get(f"{PREFIX}HTTP_HOST") == "0.0.0.0"


# --- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service():
    config = prometheus()
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in SERVICES:
        assert name in jobs, f"deploy/prometheus.yml has no job {name}"
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        interval = jobs[name].get("scrape_interval", config["global"]["scrape_interval"])
        assert interval == "15s"


def test_prometheus_mounts_this_config():
    (name,) = services_with_image("prom/prometheus")
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
               for v in svc(name).get("volumes", [])]
    mounted = {(ROOT / v.split(":")[0]).resolve(): v.split(":")[1] for v in volumes
               if v.startswith((".", "/"))}
    assert mounted.get(PROMETHEUS.resolve()) == "/etc/prometheus/prometheus.yml"
