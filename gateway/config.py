"""Gateway configuration: defaults, a YAML file, environment variables, flags.

Precedence, lowest first: the defaults below, the YAML file given with
``--config``, ``RABBITGATE_*`` environment variables, command-line flags.
Every limit of the wire protocol (``docs/protocol.md``, "Connecting") is
set here, with its default, so an operator finds them all in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anomaly.settings import AnomalySettings
from gateway.amqp_urls import redacted, url_problem
from gateway.limits.tenants import TenantSettings, parse_tenant_settings


class ConfigError(Exception):
    """A configuration that the gateway refuses to start with (one-line message)."""


ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Longer than any orchestrator waits for a process to end after SIGTERM.
MAX_SHUTDOWN_DELAY_SECONDS = 600.0
# limits.max_data_depth at most: well inside what orjson can serialize (254).
MAX_DATA_DEPTH = 128


@dataclass(frozen=True)
class JwtSettings:
    """How tokens are verified. Algorithms come from here, never from a token."""

    algorithms: tuple[str, ...] = ("HS256",)
    # HS*: the shared secret (development). Give it through RABBITGATE_JWT_SECRET
    # or a file, so it never sits in a config file that gets committed.
    secret: str | None = dataclasses.field(default=None, repr=False)
    secret_file: Path | None = None
    # RS*/ES*/EdDSA: a PEM public key file, or a JWKS URL.
    public_key_file: Path | None = None
    jwks_url: str | None = None
    jwks_cache_seconds: float = 300.0
    jwks_refresh_cooldown_seconds: float = 30.0
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = 5.0
    max_token_bytes: int = 8 * 1024
    # Private key used only by `rabbitgate token` to mint development tokens.
    dev_private_key_file: Path | None = None


@dataclass(frozen=True)
class TlsSettings:
    enabled: bool = True
    cert_file: Path = Path("certs/server.pem")
    key_file: Path = Path("certs/server.key")


@dataclass(frozen=True)
class LimitSettings:
    """Connection-level limits; per-rule publish limits live in the policies."""

    max_frame_bytes: int = 64 * 1024
    # How deeply a publish's `data` may nest (arrays/objects); deeper: bad_request.
    max_data_depth: int = 32
    send_buffer_bytes: int = 1024 * 1024
    send_buffer_messages: int = 1000
    auth_timeout_seconds: float = 5.0
    handshake_timeout_seconds: float = 10.0
    heartbeat_seconds: float = 20.0
    heartbeat_timeout_seconds: float = 20.0
    max_channels_per_connection: int = 100
    # Token buckets (rate per second, burst) and caps; see gateway/limits/limiter.py
    # and docs/security.md "Rate limits and defenses" for what each one guards.
    frames_per_second: float = 100.0  # every frame of one connection
    frames_burst: int = 500
    subscribes_per_second: float = 10.0  # subscribe requests of one connection
    subscribes_burst: int = 100
    connects_per_second_per_address: float = 10.0  # new connections of one address
    connects_burst: int = 100
    auth_failures_per_minute_per_address: float = 20.0  # refused tokens of one address
    auth_failures_burst: int = 40
    # Connections of one address closed with 4429: past this, its handshakes get 429.
    strikeouts_per_minute_per_address: float = 6.0
    strikeouts_burst: int = 3
    # Handshakes an address makes while a Retry-After it was given still runs:
    # past this many, its connections are closed before TLS (0 = never).
    handshake_refusals_before_drop: int = 10
    max_connections_per_user: int = 50
    max_connections_per_address: int = 1000
    # This many rate_limited answers within the window close the connection with 4429.
    rate_limited_strikes_before_close: int = 10
    rate_limited_strike_window_seconds: float = 10.0
    idle_timeout_seconds: float = 300.0  # no frame from the client this long: close 1000; 0 = off
    presence_per_second: float = 2.0  # presence requests of one user (all processes with Redis)
    presence_burst: int = 10
    # History replays (subscribe with `since`, SSE Last-Event-ID; gateway/replays.py).
    # One read ends after this long or this many stream messages (recovered: false).
    replay_timeout_seconds: float = 5.0
    replay_scan_limit: int = 50_000
    replays_per_user: int = 2  # reads of one user at once (more: rate_limited)
    replays_in_flight: int = 4  # reads of this process at once (more wait, up to the timeout)
    # Stream messages one user's reads may go through: a token bucket in messages.
    replay_scan_per_second_per_user: float = 1000.0
    replay_scan_burst: int = 100_000
    bucket_table_size: int = 50_000  # buckets kept in memory per kind of limit
    redis_timeout_seconds: float = 0.25  # each Redis call; slower means "Redis down"


@dataclass(frozen=True)
class StaffSettings:
    """The people who log in to the admin listener's pages (the alert review page,
    the live console): gateway/operations/staff.py, docs/console.md."""

    # Lines "name:scrypt$...[:roles]" (`rabbitgate alerts add-reviewer`, or
    # `--roles`). None: anomaly.reviewers_file, its old name; neither: no page
    # behind a login is served.
    file: Path | None = None
    # A login lasts this long (logout ends it sooner).
    session_seconds: float = 8 * 3600.0


MAX_STAFF_SESSION_SECONDS = 7 * 86400.0


@dataclass(frozen=True)
class ControlSettings:
    """How the operator's tools reach every gateway process sharing redis_url
    (gateway/operations/fleet_connections.py, docs/console.md)."""

    # Signs the control messages (HMAC-SHA256) and the operator bans kept in
    # Redis: a process ignores (and counts) any that is unsigned or signed with
    # another key. Give it through RABBITGATE_CONTROL_KEY, the same on every
    # process. None: messages are not signed and whoever can publish on the
    # Redis server can kick and ban.
    key: str | None = dataclasses.field(default=None, repr=False)
    # The Redis keys and channels of this fleet: fleets that share a Redis
    # server but must not act on each other's connections need their own.
    prefix: str = "rabbitgate:control"
    # How long a list or an action waits for the other processes; one that did
    # not answer by then is named as such ("answered": false).
    deadline_seconds: float = 1.0


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8443
    tls: TlsSettings = field(default_factory=TlsSettings)
    # One URL, or the nodes of a RabbitMQ cluster: a YAML list, or the URLs
    # separated by commas (env, flag). Kept as one comma-separated string;
    # ``amqp_urls`` splits it. The gateway connects to one node that answers,
    # picked at random, and moves to another when it is lost (gateway/broker.py).
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    broker_connect_timeout_seconds: float = 15.0
    # Retention of each exchange's history stream (see gateway/broker/broker.py).
    stream_max_bytes: int = 256 * 1024 * 1024
    stream_max_age: str = "7D"
    # Replicas of each history stream on a cluster (x-initial-cluster-size).
    # None: the smaller of 3 and the number of nodes in amqp_url.
    stream_initial_cluster_size: int | None = None
    publish_confirm_timeout_seconds: float = 5.0
    # On SIGTERM, how long to go on serving with /readyz answering 503 before
    # the listeners close, so a load balancer stops sending new clients first.
    shutdown_delay_seconds: float = 0.0
    policies_dir: Path = Path("policies")
    # Reload the policies when a *.yaml file of policies_dir changes (SIGHUP always does).
    policy_watch: bool = True
    jwt: JwtSettings = field(default_factory=JwtSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    compression: bool = False
    allowed_origins: tuple[str, ...] = ()
    # Proxies (addresses or networks) whose X-Forwarded-For names the client
    # (gateway/core/client_address.py). Empty: the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    # "json": one JSON object a line (gateway/telemetry/logs.py); "text": plain lines.
    log_format: str = "json"
    # Admin listener: /metrics, /healthz, /readyz (gateway/operations/admin.py). It has no
    # authentication: keep it on loopback or a monitoring network. 0: any free port.
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    # Server-Sent Events, GET /events (gateway/transports/sse_server.py): a second public
    # port on `host`, with the same TLS as the WebSocket one. null: off.
    sse_port: int | None = 8444
    # Share the rate limits between gateway processes (redis://, rediss://,
    # unix://). None: each process limits on its own, in memory.
    redis_url: str | None = None
    # Presence (docs/presence.md): a process that dies is gone from every count
    # after this long (its liveness key in Redis lapses). At most 30 (the contract).
    presence_ttl_seconds: float = 20.0
    # Worker processes of `rabbitgate serve` (gateway/operations/supervisor.py): a number,
    # or "auto" for the CPUs this process may run on. More than one needs
    # redis_url, so that the caps and rate limits hold across workers.
    workers: str = "1"
    # Bind the public ports with SO_REUSEPORT, so several processes share them
    # and the kernel spreads connections (the supervisor sets it for its workers).
    reuse_port: bool = False
    # Serve the admin app on this Unix socket instead of admin_host:admin_port
    # (the supervisor gives each worker one and serves the fleet's admin port).
    admin_socket: Path | None = None
    # Traffic anomaly detection and alert review (anomaly/settings.py); off by default.
    anomaly: AnomalySettings = field(default_factory=AnomalySettings)
    # Every this many seconds, collect the objects not frozen yet and freeze the
    # rest out of the collector's sight (gateway/operations/collector.py): no full
    # collection ever walks 10,000 connections. 0: Python's own GC schedule.
    gc_freeze_seconds: float = 1.0
    # Per-tenant quotas (gateway/limits/tenants.py, docs/operators.md): the claim
    # that names a tenant and each tenant's caps, shared through redis_url.
    tenants: TenantSettings = field(default_factory=TenantSettings)
    # Operators allowed the /connections endpoints of the admin listener
    # (gateway/operations/connections_admin.py): lines "NAME sha256:HEX" written
    # by `rabbitgate connections add-operator`. None: those endpoints are off.
    operators_file: Path | None = None
    # Staff of the admin pages behind a login (alert review, live console).
    staff: StaffSettings = field(default_factory=StaffSettings)
    # The operator's tools across the processes sharing redis_url.
    control: ControlSettings = field(default_factory=ControlSettings)


_SECTIONS: dict[str, type] = {
    "tls": TlsSettings,
    "jwt": JwtSettings,
    "limits": LimitSettings,
    "anomaly": AnomalySettings,
    "staff": StaffSettings,
    "control": ControlSettings,
}


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_jwt: bool = True,
) -> Settings:
    """Build Settings from the YAML file, then the environment, then ``overrides``.

    ``overrides`` uses dotted keys (``"jwt.secret"``, ``"port"``) as the CLI
    flags do. Raises ConfigError with a one-line message on any bad value.
    ``check_jwt=False`` is for commands that verify no token (``alerts``,
    ``policy explain --claims``): they must not fail on a missing secret.
    """
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_problem(config_file, exc)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping")
        raw = loaded
    for key, value in _from_environment(os.environ if environ is None else environ).items():
        _set_dotted(raw, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    settings = _build(Settings, raw, "")
    return _check(settings, check_jwt=check_jwt)


def _yaml_problem(config_file: Path, exc: yaml.YAMLError) -> str:
    """One line naming the file, line and column; PyYAML's own text is several
    lines and names the parsed string ``<unicode string>``, not the file."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{config_file}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    return f"{config_file}: not valid YAML: {' '.join(str(exc).split())}"


# RABBITGATE_* variables that belong to the tools around the settings, not to
# the settings: the config file's path, the operator CLI's token and admin URL
# (an operator's shell often has them exported when it starts a gateway), the
# setup script's reinstall switch and the browser tests' screenshot folder.
# Any other RABBITGATE_* variable is a setting, and an unknown one is an error
# (a typo must not be ignored).
NOT_SETTINGS = frozenset(
    {
        "RABBITGATE_CONFIG",
        "RABBITGATE_OPERATOR_TOKEN",
        "RABBITGATE_ADMIN_URL",
        "RABBITGATE_REINSTALL",
        "RABBITGATE_SCREENSHOTS",
    }
)


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """RABBITGATE_JWT_SECRET -> jwt.secret; RABBITGATE_AMQP_URL -> amqp_url."""
    found = {}
    for name, value in environ.items():
        if not name.startswith("RABBITGATE_") or name in NOT_SETTINGS:
            continue
        key = name[len("RABBITGATE_") :].lower()
        section, _, rest = key.partition("_")
        if section in _SECTIONS and rest:
            key = f"{section}.{rest}"
        found[key] = value
    return found


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    if name:
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config key {section!r} must be a mapping")
        raw[section][name] = value
    else:
        raw[section] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.')!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}")
        if key in _SECTIONS and cls is Settings:
            values[key] = _build(_SECTIONS[key], value or {}, f"{key}.")
        elif key == "tenants" and cls is Settings:
            try:
                values[key] = parse_tenant_settings(value)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        else:
            values[key] = _coerce(fields[key], value, f"{prefix}{key}")
    return cls(**values)


def _coerce(f: dataclasses.Field[Any], value: Any, name: str) -> Any:
    kind = str(f.type)
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return lowered in {"1", "true", "yes", "on"}
            return bool(value)
        if value is None or (_numeric_optional(kind) and isinstance(value, str) and _is_off(value)):
            if "None" in kind:
                return None
            raise ValueError("null")
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("Path"):
            return Path(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list | tuple):
                raise ValueError(value)
            return tuple(str(item) for item in value)
        if kind.startswith("str") and name == "amqp_url" and isinstance(value, list | tuple):
            # A YAML list of cluster nodes; kept comma-separated like the env form.
            return ",".join(str(item).strip() for item in value)
        if kind.startswith("str"):
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} has a bad value (expected {kind})") from None
    return value


# What an environment variable says to turn an optional number off
# (RABBITGATE_SSE_PORT=off): YAML's null is not available there. Only for
# numbers: a string setting (jwt.audience, say) keeps "none" as a value.
_OFF = frozenset({"", "off", "null", "none", "~"})


def _numeric_optional(kind: str) -> bool:
    return "None" in kind and kind.startswith(("int", "float"))


def _is_off(text: str) -> bool:
    return text.strip().lower() in _OFF


def _check(settings: Settings, *, check_jwt: bool = True) -> Settings:
    if check_jwt:
        _check_jwt(settings.jwt)
    _check_rest(settings)
    return settings


def _check_jwt(jwt: JwtSettings) -> None:
    algorithms = set(jwt.algorithms)
    if not algorithms:
        raise ConfigError("jwt.algorithms is empty: no token could ever be verified")
    unknown = algorithms - ASYMMETRIC_ALGORITHMS - SYMMETRIC_ALGORITHMS
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ConfigError(
            f"jwt.algorithms holds {names}: not a signing algorithm rabbitgate accepts"
        )
    if algorithms & SYMMETRIC_ALGORITHMS and algorithms & ASYMMETRIC_ALGORITHMS:
        raise ConfigError(
            "jwt.algorithms mixes HS* with RS*/ES*/EdDSA (key confusion risk); pick one family"
        )
    if algorithms & SYMMETRIC_ALGORITHMS:
        if not (jwt.secret or jwt.secret_file):
            raise ConfigError("jwt: HS* algorithms need jwt.secret or jwt.secret_file")
    elif not (jwt.public_key_file or jwt.jwks_url):
        raise ConfigError("jwt: RS*/ES*/EdDSA algorithms need jwt.public_key_file or jwt.jwks_url")
    if jwt.max_token_bytes <= 0 or jwt.leeway_seconds < 0:
        raise ConfigError(
            "jwt.max_token_bytes must be positive and jwt.leeway_seconds not negative"
        )


def _check_rest(settings: Settings) -> None:
    try:
        parse_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from None
    if not 0 <= settings.shutdown_delay_seconds <= MAX_SHUTDOWN_DELAY_SECONDS:
        raise ConfigError(
            f"shutdown_delay_seconds must be between 0 and {MAX_SHUTDOWN_DELAY_SECONDS:g}"
        )
    if not 0 <= settings.port < 65536:  # 0: any free port (tests)
        raise ConfigError(f"port {settings.port} is out of range")
    if settings.log_format not in ("json", "text"):
        raise ConfigError(f"log_format {settings.log_format!r} must be json or text")
    for name in ("admin_port", "sse_port"):
        value = getattr(settings, name)
        if value is not None and not 0 <= value < 65536:
            raise ConfigError(f"{name} {value} is out of range")
    _check_limits(settings.limits)
    if not 1 <= settings.presence_ttl_seconds <= 30:
        raise ConfigError("presence_ttl_seconds must be between 1 and 30")
    _check_fleet(settings)
    _check_staff(settings)
    _check_control(settings.control)
    anomaly_problem = settings.anomaly.problem()
    if anomaly_problem is not None:
        raise ConfigError(anomaly_problem)


def staff_login_settings(settings: Settings) -> tuple[Path, float] | None:
    """The staff file and login lifetime in force, or None: no page needs a login.

    ``staff.file`` wins; ``anomaly.reviewers_file`` (with
    ``anomaly.review_session_seconds``) is its old name, kept so that a
    configuration of the first version goes on working.
    """
    if settings.staff.file is not None:
        return settings.staff.file, settings.staff.session_seconds
    if settings.anomaly.reviewers_file is not None:
        return settings.anomaly.reviewers_file, settings.anomaly.review_session_seconds
    return None


def _check_control(control: ControlSettings) -> None:
    if not 0.1 <= control.deadline_seconds <= 10:
        raise ConfigError("control.deadline_seconds must be between 0.1 and 10")
    if not control.prefix or len(control.prefix) > 100 or not control.prefix.isprintable():
        raise ConfigError("control.prefix must be 1-100 printable characters")
    if control.key is not None and len(control.key) < 16:
        raise ConfigError("control.key must be at least 16 characters")


def _check_staff(settings: Settings) -> None:
    staff, old = settings.staff.file, settings.anomaly.reviewers_file
    if staff is not None and old is not None and Path(staff) != Path(old):
        raise ConfigError(
            "staff.file and anomaly.reviewers_file name different files; set staff.file"
            " only (anomaly.reviewers_file is its old name)"
        )
    lifetimes = {
        "staff.session_seconds": settings.staff.session_seconds,
        "anomaly.review_session_seconds": settings.anomaly.review_session_seconds,
    }
    for name, seconds in lifetimes.items():
        if not 60 <= seconds <= MAX_STAFF_SESSION_SECONDS:
            raise ConfigError(f"{name} must be between 60 and {MAX_STAFF_SESSION_SECONDS:g}")


def amqp_urls(settings: Settings) -> tuple[str, ...]:
    """The broker nodes of ``amqp_url``, in the order given."""
    return split_urls(settings.amqp_url)


def split_urls(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def worker_count(value: str, cpus: int | None = None) -> int:
    """``workers`` as a number: "auto" is the CPUs this process may run on.

    Raises ValueError for anything but a positive integer or "auto".
    """
    text = str(value).strip().lower()
    if text == "auto":
        return max(1, cpus if cpus is not None else len(os.sched_getaffinity(0)))
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


# More workers than this on one host is a typo, not a plan (each one holds a
# broker connection and a Redis pool).
MAX_WORKERS = 512


def _check_fleet(settings: Settings) -> None:
    """Workers, the broker URL list and stream replication."""
    try:
        workers = worker_count(settings.workers)
    except ValueError:
        raise ConfigError(
            f"workers {settings.workers!r} must be a positive number or auto"
        ) from None
    if workers > MAX_WORKERS:
        raise ConfigError(f"workers {workers} is more than {MAX_WORKERS}")
    if workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"workers {workers} needs redis_url: without the shared store each worker "
            f"would enforce the connection caps and rate limits on its own ({workers} times higher)"
        )
    urls = amqp_urls(settings)
    if not urls:
        raise ConfigError("amqp_url is empty")
    for index, url in enumerate(urls):
        problem = url_problem(url)
        if problem is not None:
            where = f"amqp_url entry {index + 1}" if len(urls) > 1 else "amqp_url"
            raise ConfigError(f"{where} ({redact_url(url)}): {problem}")
    size = settings.stream_initial_cluster_size
    if size is not None and size < 1:
        raise ConfigError("stream_initial_cluster_size must be at least 1")


def redact_url(url: str) -> str:
    try:
        return redacted(url)
    except ValueError:
        return "<unparseable URL>"


def _check_limits(limits: LimitSettings) -> None:
    """Rates must be positive, bursts and caps at least 1: a zero would lock everyone out."""
    positive = [
        "frames_per_second",
        "subscribes_per_second",
        "connects_per_second_per_address",
        "auth_failures_per_minute_per_address",
        "strikeouts_per_minute_per_address",
        "rate_limited_strike_window_seconds",
        "redis_timeout_seconds",
        "presence_per_second",
        "max_frame_bytes",
        "send_buffer_bytes",
        "send_buffer_messages",
        "auth_timeout_seconds",
        "handshake_timeout_seconds",
        "replay_timeout_seconds",
        "replay_scan_per_second_per_user",
    ]
    at_least_one = [
        "frames_burst",
        "subscribes_burst",
        "connects_burst",
        "auth_failures_burst",
        "strikeouts_burst",
        "max_connections_per_user",
        "max_connections_per_address",
        "rate_limited_strikes_before_close",
        "bucket_table_size",
        "max_channels_per_connection",
        "presence_burst",
        "replay_scan_limit",
        "replays_per_user",
        "replays_in_flight",
        "replay_scan_burst",
    ]
    for name in positive:
        if not getattr(limits, name) > 0:
            raise ConfigError(f"limits.{name} must be positive")
    for name in at_least_one:
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name} must be at least 1")
    if not 1 <= limits.max_data_depth <= MAX_DATA_DEPTH:
        # orjson frames at most 254 levels; a message frame adds its own.
        raise ConfigError(f"limits.max_data_depth must be between 1 and {MAX_DATA_DEPTH}")
    if limits.handshake_refusals_before_drop < 0:
        raise ConfigError("limits.handshake_refusals_before_drop must not be negative (0: off)")
    if limits.idle_timeout_seconds < 0:
        raise ConfigError("limits.idle_timeout_seconds must not be negative (0 turns it off)")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` as networks (core/client_address.py uses them);
    raises ValueError naming the first entry that is not an address or network."""
    parsed: list[Network] = []
    for entry in entries:
        try:
            parsed.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(parsed)
