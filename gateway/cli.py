"""The ``rabbitgate`` command: serve, certs, token, policy, connections, alerts, anomaly, detector.

Every failure an operator can cause (a bad config, a missing certificate, an
invalid policy set, an unreachable broker) ends in a one-line message and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.commands import CliError
from gateway.commands import add_config_flag as _add_config_flag
from gateway.commands import settings_from_args as _settings
from gateway.config import ConfigError, Settings
from gateway.operations import collector
from gateway.operations.durations import parse_duration
from gateway.telemetry.logs import configure_logging

DEV_SECRET_FILE = "jwt-dev.secret"
EXIT_USAGE = 2
EXIT_FAILURE = 1


EXIT_BROKEN_PIPE = 141  # what a shell reports for a process SIGPIPE ended
# A failed bind: the port (or address) is the operator's to change.
_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `serve --workers N` runs each worker with the same command line
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return code
    except (CliError, ConfigError) as exc:
        print(f"rabbitgate: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # `rabbitgate alerts list --json | head`: the reader has all it wants.
        # Python would report the unflushed rest at exit; point stdout at
        # /dev/null so that it has nowhere to fail (the Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rabbitgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _CommandsFormatter(argparse.HelpFormatter):
    """Python 3.11's formatter leaves the command names out of the help column's
    width, so a long one ("connections") would wrap; count them in."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for choice in getattr(action, "_choices_actions", ()):
            name = choice.metavar or choice.dest
            width = len(name) + self._current_indent + 4
            self._action_max_length = max(self._action_max_length, width)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabbitgate",
        description=__doc__.splitlines()[0],
        formatter_class=_CommandsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rabbitgate {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    _add_config_flag(serve)
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8443)")
    serve.add_argument(
        "--no-tls", action="store_true", help="plain ws:// (behind a TLS proxy only)"
    )
    serve.add_argument(
        "--amqp-url", help="RabbitMQ URL (default amqp://guest:guest@127.0.0.1:5672/)"
    )
    serve.add_argument("--policies", help="policies folder (default policies/)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument(
        "--log-format", choices=("json", "text"), help="one JSON object a line (default) or text"
    )
    serve.add_argument(
        "--admin-port", type=int, help="admin port: /metrics, /healthz, /readyz (default 9090)"
    )
    serve.add_argument(
        "--sse-port", type=_port_or_off, help="Server-Sent Events port, or off (default 8444)"
    )
    serve.add_argument(
        "--workers",
        help="worker processes sharing the ports: a number or auto (default 1; >1 needs redis_url)",
    )
    # Set by the supervisor for each of its workers (gateway/operations/supervisor.py).
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-admin-socket", help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    certs = commands.add_parser(
        "certs", help="make a development CA, server certificate and JWT secret"
    )
    certs.add_argument("--dir", default="certs", help="where to write them (default certs/)")
    certs.add_argument(
        "--host",
        action="append",
        dest="hosts",
        help="name or address to certify (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(run=_certs)

    token = commands.add_parser("token", help="mint a development token")
    _add_config_flag(token)
    token.add_argument("--sub", required=True, help="the user the token is for")
    token.add_argument("--roles", default="", help="comma-separated roles")
    token.add_argument("--scope", help="space-separated scopes")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d (default 1h)")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra claim (repeatable)",
    )
    token.set_defaults(run=_token)

    from gateway.policy.cli import add_policy_commands

    add_policy_commands(commands, _add_config_flag)

    # connections list|kick|ban|unban|add-operator (the admin listener's /connections)
    from gateway.operations.connections_cli import add_connections_commands

    add_connections_commands(commands)

    # alerts list|show|ack|close|add-reviewer, anomaly train|evaluate
    from anomaly.cli import add_anomaly_commands

    add_anomaly_commands(commands, _add_config_flag)
    return parser


def _port_or_off(text: str) -> int | str:
    """``--sse-port off`` turns SSE off; anything else must be a port number."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number or off") from None


# --- serve ------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "amqp_url": args.amqp_url,
        "policies_dir": args.policies,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "admin_port": args.admin_port,
        "sse_port": args.sse_port,
        "workers": args.workers,
    }
    if args.no_tls:
        overrides["tls.enabled"] = False
    worker = args.worker_index is not None
    if worker:
        # One of a supervisor's workers: a single gateway on the shared ports,
        # its admin app on the supervisor's socket for it, and (when anomaly
        # detection is on) its traffic events sent to the fleet's one detector.
        overrides.update(
            {
                "workers": "1",
                "reuse_port": True,
                "admin_socket": args.worker_admin_socket,
                "anomaly.fleet": True,
            }
        )
    settings = _settings(args, overrides)
    handler = configure_logging(settings.log_level, settings.log_format)
    if worker:
        handler.addFilter(_WorkerField(args.worker_index))
    from gateway.config import worker_count

    count = worker_count(settings.workers)
    if count > 1:
        return _supervise(settings, args.argv, count)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(_run_gateway(settings))
    return uvloop.run(_run_gateway(settings))


class _WorkerField(logging.Filter):
    """Every log line of a worker says which one (a JSON field ``worker``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._index
        return True


def _config_of(argv: list[str]) -> str | None:
    """The --config of a command line (the environment's is inherited anyway)."""
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _supervise(settings: Settings, argv: list[str], count: int) -> int:
    from gateway.operations.supervisor import (
        Supervisor,
        SupervisorError,
        fleet_children,
        fleet_problem,
    )

    problem = fleet_problem(settings, count)
    if problem is not None:
        raise CliError(problem)
    # Each worker is `serve` with the same arguments (the supervisor adds the
    # ports it holds and the worker flags; the last --port wins).
    config = _config_of(argv)
    supervisor = Supervisor(settings, argv, count, children=fleet_children(settings, config))
    try:
        return asyncio.run(supervisor.run())
    except SupervisorError as exc:
        raise CliError(str(exc)) from None


async def _run_gateway(settings: Settings) -> int:
    from gateway.app import Gateway
    from gateway.broker.broker import BrokerUnavailable
    from gateway.policy.rules import PolicyError, load_policy_set

    try:
        policies = load_policy_set(settings.policies_dir)
    except PolicyError as exc:
        raise CliError(f"policy set rejected: {exc}") from None
    gateway = Gateway(settings, policies)
    try:
        await gateway.start()
    except BrokerUnavailable as exc:
        await gateway.stop()
        raise CliError(str(exc)) from None
    except OSError as exc:
        # The WebSocket listener's bind (the SSE and admin ones say so themselves).
        if exc.errno not in _BIND_ERRORS:
            raise
        await gateway.stop()
        where = f"{settings.host}:{settings.port}"
        raise CliError(f"cannot listen on {where}: {os.strerror(exc.errno)}") from None
    # Everything alive now (modules, numpy/scikit-learn, settings, policies)
    # lives as long as the process: out of the collector's sight, a full
    # collection no longer walks it. Measured: a full collection of a
    # started gateway took ~90 ms of event loop (141,000 tracked objects).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Connections too, as they age (gateway/operations/collector.py): a process-wide
    # choice, so made here and not in Gateway (tests run many in one process).
    freezer = None
    if settings.gc_freeze_seconds > 0:
        freezer = loop.create_task(collector.run(settings.gc_freeze_seconds))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP: re-read the policies folder now (an invalid set keeps the last good one).
    loop.add_signal_handler(signal.SIGHUP, gateway.reloader.reload_soon, "SIGHUP")
    await stop.wait()
    if freezer is not None:
        freezer.cancel()
    logging.getLogger("rabbitgate").info("shutting down")
    await gateway.shut_down()
    return 0


# --- certs ------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    from gateway.devtools.devcerts import make_dev_certificates

    directory = Path(args.dir)
    hosts = tuple(args.hosts) if args.hosts else ("localhost", "127.0.0.1", "::1")
    try:
        made = make_dev_certificates(directory, hosts, overwrite=args.force)
    except FileExistsError as exc:
        raise CliError(f"{exc} (use --force to replace)") from None
    except OSError as exc:
        raise CliError(f"cannot write to {directory}: {exc.strerror}") from None
    secret_file = directory / DEV_SECRET_FILE
    if args.force or not secret_file.exists():
        _write_private(secret_file, secrets.token_hex(32) + "\n")
    print(f"CA certificate:     {made.ca_cert}  (clients trust this one)")
    print(f"server certificate: {made.server_cert} for {', '.join(hosts)}")
    print(f"JWT dev secret:     {secret_file}")
    return 0


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# --- token ------------------------------------------------------------------


def _lifetime(text: str) -> int:
    """``--ttl`` in seconds, as every other duration operators type (operations/durations.py)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise CliError(f"--ttl {text!r}: {exc}") from None
    if seconds <= 0:
        raise CliError(f"--ttl {text!r}: a token must live a while, such as 90s or 1h")
    return seconds


def _token(args: argparse.Namespace) -> int:
    from gateway.devtools.devtokens import mint_token

    settings = _settings(args)
    extra: dict[str, Any] = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"bad --claim {item!r}: use NAME=VALUE")
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    roles = [role.strip() for role in args.roles.split(",") if role.strip()]
    print(
        mint_token(
            settings.jwt,
            sub=args.sub,
            roles=roles,
            scope=args.scope,
            ttl_seconds=_lifetime(args.ttl),
            extra=extra,
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
