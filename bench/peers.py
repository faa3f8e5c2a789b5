"""The peers bench.load measures rabbitgate against, besides Web-STOMP.

- ``socketio``: Socket.IO (node) with its Redis adapter on the local Redis
  (``bench/socketio/server.js``); the CPU counted is node's plus Redis's.
- ``floor``: a bare ``websockets`` broadcast in Python (``bench/floor.py``);
  the CPU counted is that process's alone.

Each is started on a free port of 127.0.0.1 for one target run and stopped
after it. Socket.IO's npm packages are installed (``npm ci``, from
``bench/socketio/package-lock.json``) the first time they are needed.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import redis_pids
from bench.target import HOST, free_port, port_open, raise_nofile_limit

SOCKETIO_DIR = Path(__file__).resolve().parent / "socketio"
REDIS_PORT = 6379
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}"
READY_TIMEOUT_SECONDS = 30.0
NPM_TIMEOUT_SECONDS = 300


def ensure_socketio_installed() -> Path:
    """``bench/socketio/node_modules``, installing it when missing; node's path.

    Raises RuntimeError with the reason when node or npm is missing or the
    install fails.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("the socketio target needs node (Node.js 18 or later) on PATH")
    if (SOCKETIO_DIR / "node_modules" / "socket.io").is_dir() and (
        SOCKETIO_DIR / "node_modules" / "@socket.io" / "redis-adapter"
    ).is_dir():
        return Path(node)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the socketio target needs npm to install bench/socketio")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--silent"],
        cwd=SOCKETIO_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"npm ci in {SOCKETIO_DIR} failed: {detail}")
    return Path(node)


@dataclass
class PeerProcess:
    """A peer server run for one target; ``pids`` are the processes its CPU is read from."""

    kind: str
    process: subprocess.Popen[bytes]
    port: int
    extra_pids: list[int] = field(default_factory=list)
    log_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """Its own process (the backend's, Redis, are ``extra_pids``)."""
        return [self.process.pid]

    def endpoint(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "host": HOST,
            "port": self.port,
            "path": "/socket.io/?EIO=4&transport=websocket" if self.kind == "socketio" else "/",
            "ca_file": None,
            "server_hostname": None,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.log_file is not None:
            self.log_file.unlink(missing_ok=True)


def _wait_listening(peer: PeerProcess) -> PeerProcess:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not port_open(peer.port):
        if peer.process.poll() is not None or time.monotonic() > deadline:
            tail = ""
            if peer.log_file is not None and peer.log_file.exists():
                tail = "\n".join(peer.log_file.read_text().splitlines()[-10:])
            peer.stop()
            raise RuntimeError(f"the {peer.kind} peer did not start listening:\n{tail}")
        time.sleep(0.1)
    return peer


def _log_file(kind: str) -> Path:
    return Path(f"/tmp/rabbitgate-bench-{kind}-{secrets.token_hex(4)}.log")


def start_socketio() -> PeerProcess:
    """Socket.IO + Redis adapter on a free port; its Redis channels are this run's own."""
    node = ensure_socketio_installed()
    redis = redis_pids(REDIS_PORT)
    port = free_port()
    prefix = f"rgbench-sio-{secrets.token_hex(4)}"
    log_file = _log_file("socketio")
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [str(node), str(SOCKETIO_DIR / "server.js"), str(port), REDIS_URL, prefix],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=SOCKETIO_DIR,
            preexec_fn=raise_nofile_limit,
        )
    return _wait_listening(PeerProcess("socketio", process, port, redis, log_file))


def start_floor() -> PeerProcess:
    """``bench/floor.py`` (bare websockets broadcast) on a free port."""
    port = free_port()
    log_file = _log_file("floor")
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
            preexec_fn=raise_nofile_limit,
        )
    return _wait_listening(PeerProcess("floor", process, port, [], log_file))
