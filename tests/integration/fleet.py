"""Run `rabbitgate serve --workers N` (a supervisor and its workers) for tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Settings

from .processes import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


def fleet_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "admin_port": free_port(),
        "sse_port": None,
        "tls": {
            "enabled": settings.tls.enabled,
            "cert_file": str(settings.tls.cert_file),
            "key_file": str(settings.tls.key_file),
        },
        "amqp_url": settings.amqp_url,
        "policies_dir": str(settings.policies_dir),
        "policy_watch": False,
        "redis_url": REDIS_URL,
        "workers": 2,
        "log_format": "json",
        "jwt": {
            "algorithms": list(settings.jwt.algorithms),
            "issuer": settings.jwt.issuer,
            "audience": settings.jwt.audience,
        },
    }
    raw.update(extra)
    return raw


class Fleet:
    """One supervisor process; ``start`` returns once its /readyz says ready."""

    def __init__(self, settings: Settings, directory: Path, **extra: Any) -> None:
        self.raw = fleet_config(settings, **extra)
        self.port = int(self.raw["port"])
        self.admin_port = int(self.raw["admin_port"])
        self.config = directory / f"fleet-{self.port}.yaml"
        self.log = directory / f"fleet-{self.port}.log"
        self.config.write_text(yaml.safe_dump(self.raw))
        self._secret = settings.jwt.secret or ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 40) -> Fleet:
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
                raise AssertionError(f"supervisor exited early:\n{self.tail()}")
            if self.ready()[0] == 200:
                return self
            time.sleep(0.2)
        raise AssertionError(f"the fleet was not ready in time:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=5
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/readyz")
        return status, (json.loads(body) if body else {})

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.ready()[0] != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fleet did not get ready again:\n{self.tail()}")
            time.sleep(0.2)

    def metric(self, name: str, **labels: str) -> dict[str, float]:
        """Samples of ``name`` by worker (those with the given labels)."""
        _, text = self.get("/metrics")
        found: dict[str, float] = {}
        pattern = re.compile(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$")
        for line in text.splitlines():
            match = pattern.match(line)
            if match is None:
                continue
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(pairs.get(k) == v for k, v in labels.items()):
                worker = pairs.get("worker", "")
                found[worker] = found.get(worker, 0.0) + float(match.group(2))
        return found

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, from the supervisor's children."""
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids = {}
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker-index" in argv:
                pids[int(argv[argv.index(b"--worker-index") + 1])] = int(child)
        return pids

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
