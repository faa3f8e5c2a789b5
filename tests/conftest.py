"""Shared fixtures: real TLS certificates, real signed tokens, a real gateway
on the real RabbitMQ (127.0.0.1:5672). Nothing here fakes the broker."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from tests_cleanup import delete_streams

from gateway.config import JwtSettings, LimitSettings, Settings, TlsSettings
from gateway.devtools.devcerts import make_dev_certificates
from gateway.devtools.devtokens import mint_token

# The real-gateway fixtures (gateway, connect_client, client_ssl, Client).
pytest_plugins = ["gateway_fixtures", "anomaly_fixtures"]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

# pytest-xdist (scripts/test runs two workers): a file's tests run on one worker,
# in order, and these files share something more than the broker and so run one
# after another on one worker too. Every other file only uses what is its own
# (exchanges named by `exchange_prefix`, free ports, temporary directories).
_SHARED_BY = {
    # The one Redis: the default control prefix's registry and pub/sub channels,
    # presence, tenant quotas and rate-limit keys named by user and tenant.
    "redis": (
        "tests/integration/test_deploy.py",
        "tests/integration/test_fleet_connections.py",
        "tests/integration/test_limits_redis.py",
        "tests/integration/test_presence.py",
        "tests/integration/test_presence_stomp.py",
        "tests/integration/test_presence_store.py",
        "tests/integration/test_stompjs.py",
        "tests/integration/test_tenant_day_quota.py",
        "tests/integration/test_tenant_quotas.py",
        "tests/integration/test_workers.py",
    ),
    # The extra RabbitMQ nodes: the chaos node (5673, stopped and SIGSTOPped by
    # these tests) and the three-node cluster of scripts/cluster.
    "rabbitmq-nodes": (
        "tests/integration/test_chaos.py",
        "tests/integration/test_publish_confirms.py",
        "tests/integration/test_cluster.py",
        "tests/integration/test_cluster_script.py",
    ),
    # Load: each saturates a core for seconds and starts Web-STOMP, Socket.IO
    # and Redis-backed peers; beside each other they would only slow each other.
    "load": (
        "tests/integration/test_bench_smoke.py",
        "tests/integration/test_bench_flood_smoke.py",
    ),
}
_GROUP_OF = {name: group for group, names in _SHARED_BY.items() for name in names}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Send each file, or each group of files of ``_SHARED_BY``, to one worker.

    pytest-xdist's own ``loadgroup`` marks do not take on pytest 9.2 (it renames
    node ids through an attribute pytest no longer reads), so the grouping is a
    scheduler: ``loadscope`` with the scope of a test being its file's group.
    Scopes go out in collection order (``--no-loadscope-reorder`` in
    scripts/test): the long integration files first, the short unit ones last
    to even out the workers' ends.
    """
    from xdist.scheduler import LoadScopeScheduling

    missing = [name for name in _GROUP_OF if not (config.rootpath / name).exists()]
    if missing:  # a renamed file would silently lose its group
        raise pytest.UsageError(f"tests/conftest.py _SHARED_BY names no such file: {missing}")

    class SharedResourceScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]  # relative to the root: tests/integration/...
            return _GROUP_OF.get(path, path)

    return SharedResourceScheduling(config, log)


ISSUER = "rabbitgate-test"
AUDIENCE = "rabbitgate"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def jwt_settings() -> JwtSettings:
    return JwtSettings(
        algorithms=("HS256",),
        secret=secrets.token_hex(32),
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway_seconds=0,
    )


@pytest.fixture(scope="session")
def make_token(jwt_settings: JwtSettings) -> Callable[..., str]:
    def make(
        sub: str, roles: tuple[str, ...] = ("member",), ttl: float = 600, **claims: Any
    ) -> str:
        return mint_token(jwt_settings, sub=sub, roles=list(roles), ttl_seconds=ttl, extra=claims)

    return make


# Every prefix handed out in this run, so that its streams can be deleted at the end.
_PREFIXES: set[str] = set()


@pytest.fixture
def exchange_prefix() -> str:
    """Exchanges unique to one test, so tests never see each other's history."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    _PREFIXES.add(prefix)
    return prefix


@pytest.fixture(scope="session", autouse=True)
def _delete_test_streams() -> Iterator[None]:
    """After the run, delete the history streams and exchanges its tests made.

    Each stream keeps files open in RabbitMQ even with no reader: left behind,
    a few hundred test streams use up the broker's 1,024 descriptors (the
    common soft limit), and a broker out of descriptors stops serving.
    """
    yield
    if _PREFIXES:
        asyncio.run(delete_streams(_PREFIXES))


POLICY_TEMPLATE = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {{max_bytes: 4096}}
    history: 100
  - channel: "user.{{user}}.inbox"
    exchange: {p}.notify
    subscribe: ["claim:sub={{user}}"]
    publish: [nobody]
  - channel: "tenant.{{tenant}}.feed"
    exchange: {p}.feeds
    subscribe: [{{all: ["role:member", "claim:tenant={{tenant}}"]}}]
    publish: [role:admin]
  - channel: "news.{{topic}}"
    exchange: {p}.news
    subscribe: [anyone]
    publish: ["scope:news.write"]
  - channel: "small.{{topic}}"
    exchange: {p}.small
    subscribe: [anyone]
    publish: [anyone]
    history: 3
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-test.yaml").write_text(POLICY_TEMPLATE.format(p=exchange_prefix))
    return folder


@pytest.fixture
def settings(certs: Any, jwt_settings: JwtSettings, policies_dir: Path) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        tls=TlsSettings(enabled=True, cert_file=certs.server_cert, key_file=certs.server_key),
        amqp_url=AMQP_URL,
        broker_connect_timeout_seconds=10,
        policies_dir=policies_dir,
        jwt=jwt_settings,
        limits=LimitSettings(auth_timeout_seconds=1.0),
        stream_max_bytes=16 * 1024 * 1024,
        admin_port=0,  # any free port: tests run several gateways at once
        sse_port=0,
    )


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def cleanup_broker(exchange_prefix: str) -> AsyncIterator[None]:
    """Delete the test's exchanges and history streams afterwards."""
    yield
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for kind in ("chat", "notify", "feeds", "news", "small"):
            channel = await connection.channel()
            await channel.queue_delete(f"rabbitgate.stream.{exchange_prefix}.{kind}")
            await channel.exchange_delete(f"{exchange_prefix}.{kind}")
            await channel.close()
    finally:
        await connection.close()
