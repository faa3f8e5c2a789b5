"""Every code block of the docs a user would paste runs, as written, against a real
gateway: ``rabbitgate serve --config config/dev.yaml`` (TLS with freshly made dev
certificates, HS256 tokens from the dev secret, the shipped policies, the real
RabbitMQ), in a folder laid out like a clone after ``bash scripts/run``
(``.venv``, ``certs/``, ``config/``, ``policies/``, ``clients/``).

Two things differ from a user's machine, both so that the test can run next to
others: the ports 8443, 8444 and 9090 of the docs are replaced by free ones in
each block before it runs, and the gateway's policies map the shipped exchanges
to exchanges of this test (``docs<hex>.chat`` ...), deleted afterwards.

Shell blocks must exit 0; a Python block's ``print(...)  # OUTPUT`` comments must
match what it prints, in order; a console transcript's output must match; a
JavaScript block runs as a module in headless Chromium (which trusts the dev
gateway's certificate through ``--ignore-certificate-errors-spki-list``, what
docs/clients.md tells a developer to do) and must finish without throwing. How
blocks are marked is in tests/docs_blocks.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from docs_blocks import (
    DATA,
    ROOT,
    RUNNABLE,
    Block,
    blocks,
    console_steps,
    doc_files,
    expected_prints,
    matches,
    problem,
)
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from gateway.config import JwtSettings, LimitSettings, Settings, TlsSettings, load_settings
from gateway.devtools.devtokens import mint_token
from gateway.policy.rules import load_policy_set

from .cdp import CHROMIUM, Browser
from .processes import free_port

pytestmark = pytest.mark.integration

ALL_BLOCKS = [block for path in doc_files() for block in blocks(path)]
RUN = {"shell", "python", "console", "js"}


def _kind(block: Block) -> str | None:
    return RUNNABLE.get(block.language)


def _runnable(kind: str) -> list[Any]:
    return [pytest.param(b, id=b.where) for b in ALL_BLOCKS if _kind(b) == kind and not b.skipped]


@dataclass(frozen=True)
class DocGateway:
    home: Path  # the "clone" the blocks run in
    port: int
    sse_port: int
    admin_port: int
    jwt: JwtSettings
    env: dict[str, str]

    def localise(self, text: str) -> str:
        """The docs' ports -> this gateway's."""
        for documented, actual in (("8443", self.port), ("8444", self.sse_port),
                                   ("9090", self.admin_port)):  # fmt: skip
            text = text.replace(documented, str(actual))
        return text

    def token(self, sub: str = "alice", roles: tuple[str, ...] = ("member",)) -> str:
        return mint_token(self.jwt, sub=sub, roles=roles, ttl_seconds=3600)


def _make_home(home: Path, prefix: str) -> Path:
    (home / ".venv").symlink_to(ROOT / ".venv")
    for shared in ("clients", "scripts", "bench", "deploy"):
        (home / shared).symlink_to(ROOT / shared)
    shutil.copytree(ROOT / "config", home / "config")
    shutil.copytree(ROOT / "policies", home / "policies")
    subprocess.run(
        [home / ".venv" / "bin" / "rabbitgate", "certs"], cwd=home, check=True, capture_output=True
    )
    # The gateway's own copy of the policies, on exchanges of this test only.
    isolated = home / ".gateway-policies"
    isolated.mkdir()
    for source in sorted((ROOT / "policies").glob("*.yaml")):
        data = yaml.safe_load(source.read_text())
        for rule in data.get("rules", []):
            rule["exchange"] = f"{prefix}.{rule['exchange']}"
        (isolated / source.name).write_text(yaml.safe_dump(data))
    return isolated


def _wait_ready(admin_port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


def _delete_exchanges(prefix: str, kinds: list[str]) -> None:
    async def delete() -> None:
        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
        try:
            for kind in kinds:
                channel = await connection.channel()
                await channel.queue_delete(f"rabbitgate.stream.{prefix}.{kind}")
                await channel.exchange_delete(f"{prefix}.{kind}")
                await channel.close()
        finally:
            await connection.close()

    asyncio.run(delete())


@pytest.fixture(scope="module")
def doc_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocGateway]:
    home = tmp_path_factory.mktemp("clone")
    prefix = f"docs{uuid.uuid4().hex[:8]}"
    policies = _make_home(home, prefix)
    port, sse_port, admin_port = free_port(), free_port(), free_port()
    log = (home / "gateway.log").open("wb")
    process = subprocess.Popen(
        [home / ".venv" / "bin" / "rabbitgate", "serve", "--config", "config/dev.yaml",
         "--port", str(port), "--sse-port", str(sse_port), "--admin-port", str(admin_port),
         "--policies", str(policies)],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_ready(admin_port, process)
        jwt = JwtSettings(
            secret=(home / "certs" / "jwt-dev.secret").read_text().strip(),
            issuer="rabbitgate-dev",
            audience="rabbitgate",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
        # As in an activated venv: the docs write `rabbitgate ...` as often as `.venv/bin/...`.
        env["PATH"] = f"{home / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(home / ".venv")
        gateway = DocGateway(home, port, sse_port, admin_port, jwt, env)
        # The README's own command (`export TOKEN=$(...)`), for the blocks that use $TOKEN.
        minted = subprocess.run(
            [".venv/bin/rabbitgate", "token", "--config", "config/dev.yaml", "--sub", "alice",
             "--roles", "member", "--ttl", "1h"],
            cwd=home, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        env["TOKEN"] = minted.stdout.strip()
        yield gateway
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
        kinds = sorted({yaml.safe_load(p.read_text())["rules"][0]["exchange"].split(".", 1)[1]
                        for p in policies.glob("*.yaml")} | {"chat", "public", "demo"})  # fmt: skip
        _delete_exchanges(prefix, kinds)


# --- the docs themselves ---------------------------------------------------------


def test_every_pasteable_block_can_be_run_or_says_why_not() -> None:
    problems = [p for block in ALL_BLOCKS if (p := problem(block)) is not None]
    assert problems == []
    assert len([b for b in ALL_BLOCKS if _kind(b) in RUN and not b.skipped]) >= 8


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.where) for b in ALL_BLOCKS if b.language in DATA]
)
def test_data_blocks_parse(block: Block, tmp_path: Path) -> None:
    """JSON and YAML parse; a configuration loads as ``--config`` would (unknown keys,
    bad values refused) and a policy file loads as the gateway's policy set would."""
    if block.language == "json":
        json.loads(block.text)
        return
    yaml.safe_load(block.text)
    if block.loads_as == "config":
        (tmp_path / "gateway.yaml").write_text(block.text)
        # A fragment (the anomaly section, say) completes the dev setup: a JWT secret.
        fragment = "jwt" not in (yaml.safe_load(block.text) or {})
        environ = {"RABBITGATE_JWT_SECRET": "docs-" * 8} if fragment else {}
        load_settings(tmp_path / "gateway.yaml", environ=environ)
    elif block.loads_as == "policy":
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "10-docs.yaml").write_text(block.text)
        assert load_policy_set(tmp_path / "policies").rules


def test_local_links_of_the_docs_lead_somewhere() -> None:
    broken = []
    for path in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == []


# --- running them ------------------------------------------------------------------


def _run_shell(gw: DocGateway, text: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", gw.localise(text)],
            cwd=gw.home, env=gw.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"still running after {timeout:.0f} s: a command that never ends needs "
            "<!-- docs-test: stream until TEXT --> (or skip: WHY) above its block\n" + text
        )


@pytest.mark.parametrize("block", _runnable("shell"))
def test_shell_block_runs(doc_gateway: DocGateway, block: Block) -> None:
    if (until := block.stream_until) is not None:
        _run_stream(doc_gateway, block.text, until, block.publishing_to)
        return
    done = _run_shell(doc_gateway, block.text)
    assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"


def _publish_until(gw: DocGateway, channel: str, stop: threading.Event) -> None:
    """bob publishes to ``channel`` every 0.2 s until ``stop``: something to stream."""
    tls = ssl.create_default_context(cafile=str(gw.home / "certs" / "ca.pem"))
    with connect(
        f"wss://localhost:{gw.port}/ws",
        ssl=tls,
        subprotocols=[Subprotocol("rabbitgate.v1")],
        additional_headers={"Authorization": f"Bearer {gw.token('bob')}"},
    ) as ws:
        ws.recv()  # welcome
        while not stop.wait(0.2):
            ws.send(json.dumps({"type": "publish", "channel": channel, "data": {"text": "hi"}}))


def _run_stream(gw: DocGateway, text: str, until: str, publish_to: str | None = None) -> None:
    stop = threading.Event()
    if publish_to is not None:
        publisher = threading.Thread(target=_publish_until, args=(gw, publish_to, stop))
        publisher.start()
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", gw.localise(text)],
        cwd=gw.home, env=gw.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    seen = b""
    timer = threading.Timer(60, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        assert process.stdout is not None
        while until.encode() not in seen:
            chunk = process.stdout.read1(4096)
            if not chunk:
                break
            seen += chunk
    finally:
        stop.set()
        if publish_to is not None:
            publisher.join(10)
        timer.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
    assert until.encode() in seen, seen.decode(errors="replace")


@pytest.mark.parametrize("block", _runnable("python"))
def test_python_block_runs_and_prints_what_its_comments_say(
    doc_gateway: DocGateway, block: Block
) -> None:
    script = doc_gateway.home / "example.py"
    script.write_text(doc_gateway.localise(block.text))
    done = subprocess.run(
        [doc_gateway.home / ".venv" / "bin" / "python", "example.py"],
        cwd=doc_gateway.home, env=doc_gateway.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"
    printed = iter(done.stdout.splitlines())
    for expected in expected_prints(block.text):
        expected = doc_gateway.localise(expected)
        assert any(matches(expected, line) for line in printed), (
            f"{block.where}: nothing printed matches {expected!r}:\n{done.stdout}"
        )


@pytest.mark.parametrize("block", _runnable("console"))
def test_console_transcript_shows_what_the_command_prints(
    doc_gateway: DocGateway, block: Block
) -> None:
    steps = console_steps(block.text)
    assert steps, f"{block.where}: a console block without a '$ ' command"
    for step in steps:
        done = _run_shell(doc_gateway, f"{step.command} 2>&1 || true")
        got = done.stdout.rstrip("\n").splitlines()
        want = [doc_gateway.localise(line) for line in step.output]
        assert len(got) == len(want) and all(map(matches, want, got)), (
            f"{block.where}: $ {step.command}\nexpected:\n" + "\n".join(want)
            + "\ngot:\n" + "\n".join(got)
        )  # fmt: skip


# --- JavaScript in Chromium ----------------------------------------------------------


class _Pages(http.server.BaseHTTPRequestHandler):
    gateway: DocGateway
    module: str = ""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        path = self.path.split("?")[0]
        if path == "/":
            self._reply(b"<!doctype html><title>docs</title>", "text/html")
        elif path == "/rabbitgate.js":
            self._reply((ROOT / "clients" / "js" / "rabbitgate.js").read_bytes(), "text/javascript")
        elif path == "/block.js":
            self._reply(self.module.encode(), "text/javascript")
        elif path == "/api/rabbitgate-token":
            self._reply(self.gateway.token("carol").encode(), "text/plain")
        else:
            self.send_error(404)

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def spki_hash(cert_file: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 SHA-256 of the key."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.mark.parametrize("block", _runnable("js"))
async def test_javascript_block_runs_in_chromium(doc_gateway: DocGateway, block: Block) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    handler = type("Pages", (_Pages,), {"gateway": doc_gateway,
                                        "module": doc_gateway.localise(block.text)})  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    trust = spki_hash(doc_gateway.home / "certs" / "server.pem")
    try:
        async with Browser([f"--ignore-certificate-errors-spki-list={trust}"]) as browser:
            await browser.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            outcome = await browser.evaluate(
                "import('/block.js').then(() => 'ok', (e) => `threw: ${e && e.stack || e}`)"
            )
            assert outcome == "ok", f"{block.where}: {outcome}\n" + "\n".join(browser.console)
    finally:
        server.shutdown()
        server.server_close()


# --- the reference tables are complete -----------------------------------------------


def test_operators_md_lists_every_flag_of_rabbitgate_serve() -> None:
    done = subprocess.run(
        [ROOT / ".venv" / "bin" / "rabbitgate", "serve", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    flags = set(re.findall(r"(--[a-z][a-z-]+)", done.stdout)) - {"--help"}
    page = (ROOT / "docs" / "operators.md").read_text()
    assert flags and sorted(f for f in flags if f"`{f}" not in page) == []


def test_operators_md_names_every_setting() -> None:
    page = (ROOT / "docs" / "operators.md").read_text()
    missing = []
    for prefix, cls in (("", Settings), ("jwt.", JwtSettings), ("tls.", TlsSettings),
                        ("limits.", LimitSettings)):  # fmt: skip
        for f in dataclasses.fields(cls):
            if f.name in ("jwt", "tls", "limits", "anomaly"):
                continue
            # In a table row as `key`, `prefix.key`, or `limits.a`, `limits.b` lists.
            if not re.search(rf"`({re.escape(prefix)})?{re.escape(f.name)}`", page):
                missing.append(prefix + f.name)
    assert missing == []
