"""The compose stack as shipped: compose.yaml validated by Compose itself
(``docker compose config``, or the docker-compose package where the plugin is
missing; both check the file against the Compose schema without a daemon),
the Prometheus rules by ``promtool``, and the pieces checked against each
other: ports, mounts and paths of compose.yaml, Dockerfile, deploy/gateway.yaml,
the Prometheus and Grafana files. scripts/setup installs both tools."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from gateway.config import load_settings
from gateway.telemetry.metrics import Metrics

from .processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SECRET_NAMES = ("RABBITGATE_JWT_SECRET", "RABBITMQ_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


# --- tools ----------------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "neither `docker compose` nor docker-compose: run bash scripts/setup"
    return [legacy]


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool missing (Debian package prometheus): run bash scripts/setup"
    return found


def no_secrets_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRET_NAMES}


def make_secrets(env_file: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "secrets"), "--env-file", str(env_file), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs if not name.startswith("#")}


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / ".env"
    assert make_secrets(path).returncode == 0
    return path


@pytest.fixture(scope="module")
def stack(env_file: Path) -> dict[str, Any]:
    """compose.yaml as Compose resolves it, with the secrets of scripts/secrets."""
    result = subprocess.run(
        [*compose_command(), "--env-file", str(env_file), "-f", "compose.yaml", "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=no_secrets_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert isinstance(resolved, dict)
    return resolved


def ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, published, target) of each published port, short or long syntax."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.append(
                (entry.get("host_ip", ""), str(entry.get("published", "")), str(entry["target"]))
            )
            continue
        parts = str(entry).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        found.append((host_ip, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume, short or long syntax."""
    found = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            found[entry["target"]] = str(entry.get("source", ""))
        else:
            source, target = str(entry).split(":")[:2]
            found[target] = source
    return found


def deploy_settings() -> Any:
    return load_settings(DEPLOY / "gateway.yaml", environ={"RABBITGATE_JWT_SECRET": "s" * 64})


# --- compose.yaml ---------------------------------------------------------------------


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(
        [*compose_command(), "--env-file", str(empty), "-f", "compose.yaml", "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=no_secrets_env(),
        timeout=60,
    )
    assert result.returncode != 0
    assert "run bash scripts/secrets first" in result.stderr


def test_the_stack_has_every_service(stack: dict[str, Any]) -> None:
    assert set(stack["services"]) == {
        "rabbitmq",
        "redis",
        "certs",
        "gateway",
        "prometheus",
        "grafana",
    }


def test_the_gateway_publishes_websocket_and_sse_but_not_admin(stack: dict[str, Any]) -> None:
    settings = deploy_settings()
    gateway = stack["services"]["gateway"]
    published = {target: (ip, port) for ip, port, target in ports(gateway)}
    assert set(published) == {str(settings.port), str(settings.sse_port)}
    assert str(settings.admin_port) not in published
    # Reachable by Prometheus on the compose network: the listener is on every
    # interface of the container, and the port is exposed there.
    assert settings.admin_host == "0.0.0.0"
    assert str(settings.admin_port) in [str(p) for p in gateway.get("expose", [])]


def test_every_other_published_port_is_on_the_loopback_interface(stack: dict[str, Any]) -> None:
    for name, service in stack["services"].items():
        if name == "gateway":
            continue
        for host_ip, _, target in ports(service):
            assert host_ip == "127.0.0.1", (name, target)


def test_the_dockerfile_exposes_every_gateway_port() -> None:
    settings = deploy_settings()
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = {p for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    assert {str(settings.port), str(settings.sse_port), str(settings.admin_port)} <= exposed
    assert "/var/lib/rabbitgate/anomaly" in dockerfile  # the volume starts owned by the user


def test_the_healthcheck_asks_readyz_on_the_admin_port(stack: dict[str, Any]) -> None:
    settings = deploy_settings()
    check = " ".join(stack["services"]["gateway"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.admin_port}/readyz" in check


def test_the_gateway_config_paths_are_on_the_mounts(stack: dict[str, Any]) -> None:
    settings = deploy_settings()
    gateway, certs = stack["services"]["gateway"], stack["services"]["certs"]
    mounted = mounts(gateway)
    assert mounted[str(settings.tls.cert_file.parent)] == "certs"
    assert mounted[str(settings.tls.key_file.parent)] == "certs"
    assert mounts(certs)[str(settings.tls.cert_file.parent)] == "certs"
    assert mounted[str(settings.anomaly.data_dir)] == "anomaly-data"
    assert settings.anomaly.enabled
    assert mounted[str(settings.policies_dir)].endswith("policies")
    dockerfile = (ROOT / "Dockerfile").read_text()
    config_path = re.search(r'"--config", "([^"]+)"', dockerfile)
    assert config_path is not None
    assert mounted[config_path.group(1)].endswith("deploy/gateway.yaml")
    environment = gateway["environment"]
    assert "RABBITGATE_JWT_SECRET" in environment and "RABBITGATE_AMQP_URL" in environment


def test_the_broker_user_and_password_match(stack: dict[str, Any], env_file: Path) -> None:
    password = read_env(env_file)["RABBITMQ_PASSWORD"]
    rabbitmq = stack["services"]["rabbitmq"]["environment"]
    url = stack["services"]["gateway"]["environment"]["RABBITGATE_AMQP_URL"]
    user = rabbitmq["RABBITMQ_DEFAULT_USER"]
    assert rabbitmq["RABBITMQ_DEFAULT_PASS"] == password
    assert url == f"amqp://{user}:{password}@rabbitmq:5672/"
    assert user != "guest"  # guest may only connect from the broker's own host


def test_the_certs_service_makes_a_certificate_once(stack: dict[str, Any], tmp_path: Path) -> None:
    """Its command, run here against a folder in place of the certs volume."""
    certs = stack["services"]["certs"]
    assert certs["entrypoint"] == ["sh", "-c"]
    command = " ".join(certs["command"]).replace("/app/certs", str(tmp_path / "certs"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(2):  # the second start keeps what the first made
        result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        if _ == 0:
            made = (tmp_path / "certs" / "server.pem").read_bytes()
    assert (tmp_path / "certs" / "server.pem").read_bytes() == made
    cert = x509.load_pem_x509_certificate(made)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gateway"} <= set(names.get_values_for_type(x509.DNSName))


# --- scripts/secrets ---------------------------------------------------------------------


def test_scripts_secrets_writes_private_random_values_once(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    first = make_secrets(path)
    assert first.returncode == 0, first.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    values = read_env(path)
    assert set(values) == set(SECRET_NAMES)
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in values.values())
    assert len(set(values.values())) == 3
    assert make_secrets(path).returncode == 0
    assert read_env(path) == values  # kept
    assert make_secrets(path, "--force").returncode == 0
    assert set(read_env(path).values()).isdisjoint(values.values())


def test_the_secrets_are_never_committed() -> None:
    for name in (".env", "certs/server.key", "certs/jwt-dev.secret"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert result.returncode == 0, f"{name} is not ignored by git"


# --- Prometheus -----------------------------------------------------------------------------


def test_prometheus_config_is_valid_and_scrapes_the_admin_port() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in config["scrape_configs"]
        if job["job_name"] == "rabbitgate"
        for static in job["static_configs"]
        for t in static["targets"]
    ]
    assert targets == [f"gateway:{deploy_settings().admin_port}"]


def test_the_alert_rules_pass_their_promtool_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "rabbitgate-rules.test.yml"],
        capture_output=True,
        text=True,
        cwd=DEPLOY / "prometheus",
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rabbitgate-rules.yml").read_text())
    return [rule for group in groups["groups"] for rule in group["rules"]]


def test_every_rule_is_tested_and_names_exported_metrics() -> None:
    tests = (DEPLOY / "prometheus" / "rabbitgate-rules.test.yml").read_text()
    exported = {family.name for family in _all_metrics().registry.collect()}
    bases = exported | {f"{name}_total" for name in exported}
    for rule in rules():
        assert f"alertname: {rule['alert']}\n" in tests, rule["alert"]
        for name in re.findall(r"rabbitgate_[a-z_]+", rule["expr"]):
            assert re.sub(r"_bucket$", "", name) in bases, (rule["alert"], name)


def _all_metrics() -> Metrics:
    from types import SimpleNamespace

    metrics = Metrics()
    node = SimpleNamespace(
        sessions=[],
        hub=[],
        broker=SimpleNamespace(connected=True),
        dropped_messages=0,
        policies=SimpleNamespace(digest="d", rules=[], exchanges=frozenset),
        limiter=SimpleNamespace(
            redis_url="redis://x",
            redis_healthy=True,
            redis_failures=0,
            tenant_gauges=lambda: [("acme", "connections", 1, 10)],
            tenant_usage={("acme", "messages_per_day"): 0.5},
            tenant_refusals={("acme", "publish"): 1},
        ),
    )
    reloader = SimpleNamespace(reloads_ok=0, reloads_failed=0, last_error=None, loaded_at=1.0)
    metrics.watch(SimpleNamespace(node=node, reloader=reloader))
    return metrics


# What the operators' docs say to watch: each one has a rule.
WATCHED = (
    "rabbitgate_broker_connected",
    "rabbitgate_publish_failures_total",
    "rabbitgate_publish_confirm_seconds",
    "rabbitgate_delivery_latency_seconds",
    "rabbitgate_connections_closed_total",
    "rabbitgate_send_buffer_max_bytes",
    "rabbitgate_auth_failures_total",
    "rabbitgate_authorization_denials_total",
    "rabbitgate_rate_limited_total",
    "rabbitgate_policy_last_reload_failed",
    "rabbitgate_policy_set_info",
)


def what_to_watch_section() -> str | None:
    """The "What to watch" section of the README or docs/, wherever it lives now."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        if path.exists():
            found = re.search(r"^#+ What to watch\n(.*?)(?=^#)", path.read_text(), re.S | re.M)
            if found:
                return found.group(1)
    return None


def test_every_metric_to_watch_has_a_rule() -> None:
    exprs = " ".join(rule["expr"] for rule in rules())
    watched = set(WATCHED)
    section = what_to_watch_section()
    if section is not None:
        watched |= set(re.findall(r"rabbitgate_[a-z_]+", section))
    missing = sorted(name for name in watched if name not in exprs)
    assert not missing, f"deploy/prometheus/rabbitgate-rules.yml has no rule on {missing}"


# --- Grafana --------------------------------------------------------------------------------


def test_grafana_gets_the_dashboard_and_the_data_source(stack: dict[str, Any]) -> None:
    grafana = mounts(stack["services"]["grafana"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert Path(grafana["/etc/grafana/provisioning"]).resolve() == provisioning.resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "rabbitgate.yaml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = {t: s for t, s in grafana.items() if t.startswith(folder + "/")}
    assert [Path(s).name for s in dashboards.values()] == ["grafana-dashboard.json"]
    json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    prometheus = stack["services"]["prometheus"]
    assert "prometheus" in stack["services"] and prometheus["image"].startswith("prom/")
    assert source["url"] == "http://prometheus:9090"


# --- the image's config on a real gateway -----------------------------------------------------


def test_the_image_config_serves_and_the_healthcheck_passes(
    stack: dict[str, Any], tmp_path: Path, certs: Any, policies_dir: Path
) -> None:
    """deploy/gateway.yaml on this machine: the compose paths and hosts swapped
    for local ones by the environment variables, the rest as shipped
    (anomaly detection on, SSE on, admin on every interface)."""
    admin, ws, sse = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    env.update(
        RABBITGATE_JWT_SECRET="s" * 64,
        RABBITGATE_HOST="127.0.0.1",
        RABBITGATE_PORT=str(ws),
        RABBITGATE_SSE_PORT=str(sse),
        RABBITGATE_ADMIN_HOST="127.0.0.1",
        RABBITGATE_ADMIN_PORT=str(admin),
        RABBITGATE_TLS_CERT_FILE=str(certs.server_cert),
        RABBITGATE_TLS_KEY_FILE=str(certs.server_key),
        RABBITGATE_POLICIES_DIR=str(policies_dir),
        RABBITGATE_ANOMALY_DATA_DIR=str(tmp_path / "anomaly"),
        RABBITGATE_ANOMALY_REVIEWERS_FILE=str(tmp_path / "anomaly" / "reviewers"),
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(DEPLOY / "gateway.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    check = stack["services"]["gateway"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    argv = [sys.executable if a == "python" else a for a in check[1:]]
    argv = [a.replace(":9090/", f":{admin}/") for a in argv]
    try:
        healthy = False
        for _ in range(150):  # the container's start_period is 30 s
            if gateway.poll() is not None:
                break
            if subprocess.run(argv, capture_output=True, timeout=10).returncode == 0:
                healthy = True
                break
            time.sleep(0.2)
        assert healthy, f"never ready: {shlex.join(argv)}"
    finally:
        gateway.send_signal(signal.SIGTERM)
        _, stderr = gateway.communicate(timeout=30)
    assert gateway.returncode == 0, stderr
    assert f"SSE on https://127.0.0.1:{sse}/events" in stderr


# --- scripts/setup's install stamp ------------------------------------------------------------


def test_setup_recorded_what_it_installed_so_that_run_skips_pip() -> None:
    """scripts/setup (run before the suite) left the hash of the package set it
    installed; the next setup compares it and runs pip only when it differs."""
    import hashlib

    setup = (ROOT / "scripts" / "setup").read_text()
    assert ".venv/.rabbitgate-install-stamp" in setup
    venv_python = ROOT / ".venv" / "bin" / "python"
    version = subprocess.run(
        [str(venv_python), "--version"], capture_output=True, text=True, check=True
    ).stdout
    files = (ROOT / "pyproject.toml").read_bytes()
    files += (ROOT / "clients" / "python" / "pyproject.toml").read_bytes()
    wanted = hashlib.sha256(files + version.encode()).hexdigest()
    stamp = ROOT / ".venv" / ".rabbitgate-install-stamp"
    assert stamp.read_text().strip() == wanted
    # A second setup with nothing changed keeps the stamp and does not reinstall.
    before = stamp.stat().st_mtime_ns
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert stamp.stat().st_mtime_ns == before
    assert "pip" not in result.stderr.lower()
