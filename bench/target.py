"""The servers a benchmark runs against: a gateway process it starts itself, or
RabbitMQ's Web-STOMP plugin on the same broker.

``start_gateway`` writes a throw-away configuration into a temp folder (a
policy file with one ``anyone`` rule on ``bench.{x}``, an HS256 secret made for
this run, development TLS certificates when asked), starts ``rabbitgate
serve`` on a free port of 127.0.0.1 and waits until it listens. Each run gets
its own exchange, deleted with its history stream when the run ends, so runs
never see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.proc import broker_pids, open_files
from gateway.config import JwtSettings, LimitSettings, Settings
from gateway.devtools.devcerts import client_ssl_context, make_dev_certificates
from gateway.devtools.devtokens import mint_token

HOST = "127.0.0.1"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
WEBSTOMP_PORT = 15674
WEBSTOMP_PATH = "/ws"
WEBSTOMP_PLUGIN = "rabbitmq_web_stomp"
ISSUER = "rabbitgate-bench"
AUDIENCE = "rabbitgate"
CHANNEL = "bench.x"
READY_TIMEOUT_SECONDS = 40.0
# The per-connection and per-address abuse limits are sized for people, not
# for a load tool that opens thousands of connections from one address and
# publishes hundreds of frames a second on one of them. They are raised (so
# they are still checked on every frame, at their usual cost) but never hit.
# Keys the gateway does not know (yet) are left out.
BENCH_LIMITS: dict[str, float] = {
    "frames_per_second": 1_000_000,
    "frames_burst": 1_000_000,
    "subscribes_per_second": 100_000,
    "subscribes_burst": 100_000,
    "connects_per_second_per_address": 1_000_000,
    "connects_burst": 1_000_000,
    "max_connections_per_user": 1_000_000,
    "max_connections_per_address": 1_000_000,
    "bucket_table_size": 200_000,
}


# Other listeners a gateway may open on fixed ports: any free port, or off, so
# that a benchmark never collides with a gateway already running here.
BENCH_SETTINGS: dict[str, object] = {"admin_port": 0, "sse_port": None}


def bench_settings() -> dict[str, object]:
    known = {f.name for f in dataclasses.fields(Settings)}
    return {name: value for name, value in BENCH_SETTINGS.items() if name in known}


def bench_limits() -> dict[str, float]:
    known = {f.name for f in dataclasses.fields(LimitSettings)}
    return {name: value for name, value in BENCH_LIMITS.items() if name in known}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def raise_nofile_limit() -> int:
    """Raise this process's open-files soft limit to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class GatewayProcess:
    """A running ``rabbitgate serve`` started by ``start_gateway``."""

    process: subprocess.Popen[bytes]
    port: int
    tls: bool
    workdir: Path
    jwt: JwtSettings
    exchange: str
    ca_file: Path | None = None
    log_file: Path = field(default_factory=Path)
    amqp_url: str = AMQP_URL

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The gateway's process and its children (a supervisor's workers)."""
        found = [self.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
            found += [int(child) for child in children.split()]
        return found

    def token(self, sub: str, ttl_seconds: float = 3600) -> str:
        return mint_token(self.jwt, sub=sub, roles=["bench"], ttl_seconds=ttl_seconds)

    def client_ssl(self) -> ssl.SSLContext | None:
        return client_ssl_context(self.ca_file) if self.ca_file is not None else None

    def endpoint(self) -> dict[str, object]:
        """What a client worker needs to connect (picklable)."""
        return {
            "kind": "gateway",
            "host": HOST,
            "port": self.port,
            "path": "/ws",
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "server_hostname": "localhost" if self.tls else None,
            "jwt_secret": self.jwt.secret,
            "issuer": ISSUER,
            "audience": AUDIENCE,
        }

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; removes the temp folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            asyncio.run(delete_exchange(self.exchange, self.amqp_url.split(",")[0]))


def _gateway_preexec() -> None:  # runs in the child before exec
    raise_nofile_limit()


PROBE_SCRIPT = Path(__file__).resolve().parent / "probe.py"


def start_gateway(
    *,
    tls: bool,
    log_level: str = "WARNING",
    source: Path | None = None,
    probe_file: Path | None = None,
    python: str | None = None,
    env_extra: dict[str, str] | None = None,
    extra: dict[str, object] | None = None,
) -> GatewayProcess:
    """Start a gateway on a free port; raises RuntimeError when it does not come up.

    ``source``: a folder holding another copy of the ``gateway`` package to run
    instead of the installed one (to measure a change before making it).
    ``probe_file``: run it under ``bench/probe.py`` (loop lag and GC pauses,
    written to that file on SIGUSR2). ``python``: another interpreter (one
    with the gateway's dependencies installed). ``env_extra``: added to its
    environment (e.g. RABBITGATE_GC_* settings under test).
    ``extra``: settings on top of the bench's own (workers, amqp_url, ...).
    """
    workdir = Path(tempfile.mkdtemp(prefix="rabbitgate-bench-"))
    exchange = f"rgbench-{secrets.token_hex(4)}"
    policies = workdir / "policies"
    policies.mkdir()
    policy = {
        "version": 1,
        "rules": [
            {
                "channel": "bench.{x}",
                "exchange": exchange,
                "subscribe": ["anyone"],
                "publish": ["anyone"],
            }
        ],
    }
    (policies / "10-bench.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    secret = secrets.token_hex(32)
    secret_file = workdir / "jwt.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    port = free_port()
    config: dict[str, object] = {
        "host": HOST,
        "port": port,
        "amqp_url": AMQP_URL,
        "policies_dir": str(policies),
        "stream_max_bytes": 64 * 1024 * 1024,
        "log_level": log_level,
        "limits": bench_limits(),
        **bench_settings(),
        "jwt": {
            "algorithms": ["HS256"],
            "secret_file": str(secret_file),
            "issuer": ISSUER,
            "audience": AUDIENCE,
        },
        **(extra or {}),
    }
    ca_file = None
    if tls:
        certs = make_dev_certificates(workdir / "certs")
        config["tls"] = {
            "enabled": True,
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
        }
        ca_file = certs.ca_cert
    else:
        config["tls"] = {"enabled": False}
    config_file = workdir / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log_file = workdir / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    if source is not None:
        if not (source / "gateway" / "cli.py").is_file():
            raise RuntimeError(f"{source} holds no gateway/cli.py")
        env["PYTHONPATH"] = str(source.resolve())
    elif python is not None:  # the other interpreter runs this copy of the code
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update(env_extra or {})
    interpreter = python or sys.executable
    serve = ["serve", "--config", str(config_file)]
    if probe_file is not None:
        command = [interpreter, str(PROBE_SCRIPT), str(probe_file), *serve]
    else:
        command = [interpreter, "-m", "gateway.cli", *serve]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str((source or Path(__file__).resolve().parents[1]).resolve()),
            preexec_fn=_gateway_preexec,
        )
    jwt = JwtSettings(algorithms=("HS256",), secret=secret, issuer=ISSUER, audience=AUDIENCE)
    gateway = GatewayProcess(
        process, port, tls, workdir, jwt, exchange, ca_file, log_file, str(config["amqp_url"])
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = gateway.log_tail()
            gateway.stop()
            raise RuntimeError(f"the gateway did not start listening on {port}:\n{tail}")
        time.sleep(0.1)
    return gateway


async def delete_exchange(exchange: str, amqp_url: str = AMQP_URL) -> None:
    """Delete a run's exchange and its history stream (best effort)."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"rabbitgate.stream.{exchange}")
        await channel.exchange_delete(exchange)
    finally:
        await connection.close()


# Descriptors the broker must keep free besides one per Web-STOMP connection.
BROKER_FD_MARGIN = 150


def check_broker_headroom(connections: int) -> None:
    """Refuse to open more Web-STOMP connections than the broker has descriptors for.

    Each Web-STOMP client is a socket of the broker process. RabbitMQ running
    out of descriptors does not just refuse connections: its memory monitor
    and Mnesia crash with emfile and the node stops serving every client until
    ``rabbitmqctl stop_app && rabbitmqctl start_app`` (seen here with 1,000
    clients under the common 1,024 soft limit).
    """
    for pid in broker_pids():
        used, limit = open_files(pid)
        if used + connections + BROKER_FD_MARGIN > limit:
            raise RuntimeError(
                f"Web-STOMP with {connections} connections needs about "
                f"{used + connections + BROKER_FD_MARGIN} file descriptors in RabbitMQ "
                f"(pid {pid}), whose limit is {limit}: start RabbitMQ with a higher one "
                "(`ulimit -n 65536` before `rabbitmq-server -detached`, or LimitNOFILE=)"
            )


def ensure_webstomp(connections: int = 0) -> None:
    """Make sure Web-STOMP listens on 127.0.0.1:15674, enabling the plugin if needed,
    and that the broker has descriptors for ``connections`` more clients.

    Raises RuntimeError with the reason when it cannot be enabled or would run out.
    """
    check_broker_headroom(connections)
    if port_open(WEBSTOMP_PORT):
        return
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None:
        raise RuntimeError(
            "Web-STOMP is not listening on 15674 and rabbitmq-plugins is not installed"
        )
    result = subprocess.run(
        [plugins, "enable", WEBSTOMP_PLUGIN],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"rabbitmq-plugins enable {WEBSTOMP_PLUGIN} failed: {' '.join(detail)}")
    deadline = time.monotonic() + 30
    while not port_open(WEBSTOMP_PORT):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{WEBSTOMP_PLUGIN} enabled but nothing listens on 15674")
        time.sleep(0.2)


def webstomp_endpoint() -> dict[str, object]:
    return {
        "kind": "webstomp",
        "host": HOST,
        "port": WEBSTOMP_PORT,
        "path": WEBSTOMP_PATH,
        "ca_file": None,
        "server_hostname": None,
    }
