"""Run real `rabbitgate serve` processes for tests that kill or signal them."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gateway.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
