"""Run real `rabbitgate serve` processes for tests that kill or signal them."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gateway.config import Settings

# Ports handed to processes that listen on them later. Asking the kernel (bind to port 0,
# close, pass the number on) races: the number is free again at once, in the ephemeral
# range the kernel gives every other bind(0) and outgoing connection, so two xdist workers
# (or a worker and its own RabbitMQ connections) can be handed the same one before the
# child process binds it - CI saw "Address already in use" that way. Instead each worker
# counts through its own block below the ephemeral range (32768-60999 here), which the
# kernel never hands out, starting at a random place so that runs side by side on a shared
# machine rarely meet; a port something already holds is skipped by a probe bind.
_BLOCK = 1000
_FIRST = 10_000  # blocks 10000-19999: clear of RabbitMQ's 5672/25672 and the test nodes'


def _worker_block() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... or unset
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    return _FIRST + (index % 10) * _BLOCK


_next_offset = random.randrange(_BLOCK)


def free_port() -> int:
    """A port nobody listens on now that no other test worker will be handed."""
    global _next_offset
    base = _worker_block()
    for _ in range(_BLOCK):
        port = base + _next_offset
        _next_offset = (_next_offset + 1) % _BLOCK
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by someone (or in TIME_WAIT): the next one
        return port
    raise RuntimeError(f"no free port in {base}-{base + _BLOCK - 1}")


class GatewayProcess:
    """One `rabbitgate serve` child process configured like the `settings` fixture."""

    def __init__(self, settings: Settings, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.config = directory / f"gateway-{self.port}.yaml"
        self.log = directory / f"gateway-{self.port}.log"
        raw = {
            "host": "127.0.0.1",
            "port": self.port,
            "tls": {
                "enabled": settings.tls.enabled,
                "cert_file": str(settings.tls.cert_file),
                "key_file": str(settings.tls.key_file),
            },
            "amqp_url": settings.amqp_url,
            "policies_dir": str(settings.policies_dir),
            "jwt": {
                "algorithms": list(settings.jwt.algorithms),
                "issuer": settings.jwt.issuer,
                "audience": settings.jwt.audience,
            },
        }
        field_names = {f.name for f in dataclasses.fields(Settings)}
        if "admin_port" in field_names:
            raw["admin_port"] = 0
        if "sse_port" in field_names:
            raw["sse_port"] = None
        self.config.write_text(yaml.safe_dump(raw))
        self._secret = settings.jwt.secret or ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> GatewayProcess:
        env = dict(os.environ, RABBITGATE_JWT_SECRET=self._secret)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"gateway did not listen in time:\n{self.log.read_text()[-2000:]}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
