"""``rabbitgate serve --workers N``: one supervisor, N worker processes, shared ports.

Every worker is a whole gateway (``rabbitgate serve`` again, with hidden
``--worker-*`` flags): its own event loop, broker connection, Redis pool and
subscribers. The workers bind the public ports (WebSocket, SSE) with
SO_REUSEPORT, so the kernel spreads new connections over them; a connection
lives in one worker for its whole life.

The supervisor itself serves no client. It

* reserves the public ports first (a bound, never listening SO_REUSEPORT
  socket): a port another process holds is one line and exit 1 before any
  worker starts, and port 0 becomes one port that every worker shares;
* starts the workers and keeps them: a worker that dies is started again
  after a delay that doubles with each quick death up to a cap
  (``on_exit``), so a worker that cannot live never turns into a fork storm;
  a worker that dies before the fleet was ever ready (it could not bind, load
  its policies, reach the broker) ends the supervisor with exit 1;
* passes SIGTERM/SIGINT on (each worker drains as a single gateway does,
  ``shutdown_delay_seconds`` included) and SIGHUP (each reloads its policies);
* serves the one admin port: ``/metrics`` merges every worker's metrics,
  each series labelled ``worker="i"`` (``gateway/operations/fleetmetrics.py``), and
  ``/readyz`` is ready only while every worker is. Each worker serves its own
  admin app on a Unix socket in a private directory. The operator's tools
  (``/connections*``, ``/console/*``, ``/alerts/*``) are forwarded to one
  ready worker, the same one while it lives (the staff logins are held in
  its memory); its Connections service covers every worker through Redis
  (``gateway/operations/fleet_connections.py``).

Decisions (``on_exit``, ``fleet_readiness``) are pure and table-tested; the
rest is I/O. Workers are separate interpreters (``exec``), never ``fork``s of
a started gateway: the supervisor has threads and sockets a fork would copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config import Settings
from gateway.operations.fleetmetrics import render
from gateway.operations.staff_login import FORWARDED_FOR
from gateway.transports.httplistener import HttpListener

log = logging.getLogger("rabbitgate.supervisor")

# How often the supervisor asks each worker's /readyz (startup detection, the
# rabbitgate_worker_ready gauge); /readyz of the supervisor asks afresh.
PROBE_INTERVAL_SECONDS = 0.5
WORKER_REQUEST_TIMEOUT_SECONDS = 2.0
# After the workers' own drain (shutdown_delay_seconds and the close of every
# connection), how long the supervisor waits before it kills what is left.
STOP_GRACE_SECONDS = 30.0
PR_SET_PDEATHSIG = 1
# A forwarded operator request waits for the fleet-wide list (control.deadline_seconds).
FORWARD_TIMEOUT_SECONDS = 30.0
# Not passed on either way: they describe one hop, not the request.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        FORWARDED_FOR.lower(),
    }
)


class SupervisorError(Exception):
    """A failure reported as one line on stderr (the CLI prints it)."""


# --- decisions (pure) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    # A worker that ran at least this long died of something new: its next
    # restart waits the base delay again.
    stable_after_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Restart:
    delay: float
    quick_failures: int  # deaths in a row, each within stable_after of its start


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


@dataclass(frozen=True, slots=True)
class Expected:
    """The supervisor is stopping: a worker's exit is what it asked for."""


Decision = Restart | GiveUp | Expected


def on_exit(
    *,
    stopping: bool,
    fleet_started: bool,
    was_ready: bool,
    ran_seconds: float,
    quick_failures: int,
    backoff: Backoff,
) -> Decision:
    """What to do about a worker process that ended."""
    if stopping:
        return Expected()
    if not fleet_started and not was_ready:
        # Its own one-line error (a port, the policies, the broker) is on
        # stderr already; the same cause would stop every restart too.
        return GiveUp("could not start")
    failures = quick_failures + 1 if ran_seconds < backoff.stable_after_seconds else 0
    delay = min(backoff.cap_seconds, backoff.base_seconds * 2 ** min(failures, 32))
    return Restart(delay, failures)


def fleet_readiness(answers: Sequence[str | None], stopping: bool) -> str | None:
    """Why the fleet cannot serve, or None when every worker can.

    ``answers[i]`` is worker i's reason for not being ready (None: ready).
    """
    if stopping:
        return "shutting down"
    for index, reason in enumerate(answers):
        if reason is not None:
            return f"worker {index}: {reason}"
    return None


# --- ports ------------------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the workers: bound with SO_REUSEPORT, never listening.

    A fixed port is first bound without SO_REUSEPORT: that fails if any
    process listens there, even one that shares it (another gateway's
    workers), which SO_REUSEPORT alone would let us join silently.
    Raises SupervisorError with one line.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SupervisorError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    try:
        if port != 0:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        held = socket.socket(family, kind, proto)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise SupervisorError(f"cannot listen on {host}:{port}: {reason}") from None
    return held


# --- processes --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A process the supervisor keeps alive besides the workers (no admin app).

    The hook for the fleet anomaly detector (``rabbitgate detector``): one for
    the whole fleet, not one per worker.
    """

    name: str
    argv: tuple[str, ...]


@dataclass
class _Worker:
    index: int  # -1 for a ChildSpec
    name: str
    argv: list[str]  # after `python -m gateway.cli`
    admin_socket: Path | None  # None for a ChildSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False  # the latest probe said ready
    was_ready: bool = False  # this life of the process was ready once
    quick_failures: int = 0
    restarts: int = 0
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (even by kill -9),
    so workers never outlive it holding the ports."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        worker_argv: Sequence[str],
        count: int,
        *,
        children: Sequence[ChildSpec] = (),
        backoff: Backoff | None = None,
    ) -> None:
        """``worker_argv``: the ``serve`` command line (after the program name)
        each worker runs, plus its ``--worker-*`` flags."""
        self.settings = settings
        self.count = count
        self.backoff = backoff or Backoff()
        self._argv = list(worker_argv)
        self._children = list(children)
        self._dir = Path(tempfile.mkdtemp(prefix="rabbitgate-workers-"))
        self._workers: list[_Worker] = []
        self._held: list[socket.socket] = []
        self._admin: HttpListener | None = None
        self._stop = asyncio.Event()
        self.stopping = False
        self.fleet_started = False
        self.failure: str | None = None
        # The worker the operator's pages and endpoints go to (see _forward_operator).
        self._operator_worker: tuple[_Worker, int] | None = None

    async def run(self) -> int:
        """Start the fleet, keep it until SIGTERM/SIGINT; the exit status.

        Raises SupervisorError (one line) when a port cannot be held.
        """
        try:
            return await self._run()
        finally:
            for held in self._held:
                held.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _run(self) -> int:
        s = self.settings
        port = self._hold(s.host, s.port)
        flags = ["--port", str(port)]
        if s.sse_port is not None:
            flags += ["--sse-port", str(self._hold(s.host, s.sse_port))]
        self._admin = HttpListener(self._admin_app(), s.admin_host, s.admin_port)
        try:
            await self._admin.start()
        except OSError as exc:
            await self._admin.stop()
            raise SupervisorError(
                f"cannot listen on {s.admin_host}:{s.admin_port}: {exc.strerror or exc}"
            ) from None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        for index in range(self.count):
            path = self._dir / f"worker-{index}.sock"
            argv = [*self._argv, *flags, "--worker-index", str(index)]
            argv += ["--worker-admin-socket", str(path)]
            self._workers.append(_Worker(index, f"worker {index}", argv, path))
        for child in self._children:
            self._workers.append(_Worker(-1, child.name, list(child.argv), None))
        log.info(
            "starting %d workers on %s:%d (admin on http://%s:%d)",
            self.count,
            s.host,
            port,
            s.admin_host,
            self._admin.port,
        )
        keepers = [asyncio.create_task(self._keep(worker)) for worker in self._workers]
        probe = asyncio.create_task(self._probe_forever())
        try:
            await self._stop.wait()
            self.stopping = True
            await self._stop_all()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            probe.cancel()
            for task in keepers:
                task.cancel()
            for worker in self._workers:
                if worker.session is not None:
                    await worker.session.close()
            await self._admin.stop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        if self.failure is not None:
            log.error("%s; the supervisor stopped", self.failure)
            return 1
        log.info("all workers stopped")
        return 0

    @property
    def admin_port(self) -> int:
        assert self._admin is not None
        return self._admin.port

    def _hold(self, host: str, port: int) -> int:
        held = reserve_port(host, port)
        self._held.append(held)
        return int(held.getsockname()[1])

    # --- keeping workers alive --------------------------------------------

    async def _keep(self, worker: _Worker) -> None:
        while not self.stopping:
            await self._spawn(worker)
            assert worker.process is not None
            status = await worker.process.wait()
            worker.ready = False
            decision = on_exit(
                stopping=self.stopping,
                fleet_started=self.fleet_started or worker.admin_socket is None,
                was_ready=worker.was_ready,
                ran_seconds=time.monotonic() - worker.started_at,
                quick_failures=worker.quick_failures,
                backoff=self.backoff,
            )
            match decision:
                case Expected():
                    return
                case GiveUp(reason=reason):
                    self.failure = f"{worker.name} {reason} (exit status {status})"
                    self._stop.set()
                    return
                case Restart(delay=delay, quick_failures=failures):
                    worker.quick_failures = failures
                    worker.restarts += 1
                    log.warning(
                        "%s ended (exit status %s); starting it again in %.1f s",
                        worker.name,
                        status,
                        delay,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)

    async def _spawn(self, worker: _Worker) -> None:
        if worker.admin_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                worker.admin_socket.unlink()
        worker.was_ready = False
        worker.started_at = time.monotonic()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            *worker.argv,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.alive:
                assert worker.process is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)
        log.info("passed %s on to the workers", signal.Signals(signum).name)

    async def _stop_all(self) -> None:
        log.info("stopping %d workers", self.count)
        self._forward(signal.SIGTERM)
        deadline = self.settings.shutdown_delay_seconds + STOP_GRACE_SECONDS
        waits = [w.process.wait() for w in self._workers if w.alive and w.process is not None]
        if not waits:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=deadline)
        if pending:
            for worker in self._workers:
                if worker.alive and worker.process is not None:
                    log.warning("%s did not stop in time; killing it", worker.name)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.wait(pending, timeout=10)

    # --- asking workers -----------------------------------------------------

    def _session(self, worker: _Worker) -> aiohttp.ClientSession:
        if worker.session is None:
            assert worker.admin_socket is not None
            worker.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(worker.admin_socket)),
                timeout=aiohttp.ClientTimeout(total=WORKER_REQUEST_TIMEOUT_SECONDS),
            )
        return worker.session

    async def _ask(self, worker: _Worker, path: str) -> tuple[int, str] | None:
        """A worker's admin answer (status, body), or None when it gave none."""
        if not worker.alive:
            return None
        try:
            async with self._session(worker).get(f"http://worker{path}") as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def _readiness_of(self, worker: _Worker) -> str | None:
        answer = await self._ask(worker, "/readyz")
        if answer is None:
            return "not running" if not worker.alive else "not answering"
        status, body = answer
        ready = status == 200
        worker.ready = ready
        if ready:
            worker.was_ready = True
            return None
        return _reason(body)

    async def _probe(self) -> list[str | None]:
        workers = [w for w in self._workers if w.admin_socket is not None]
        answers = list(await asyncio.gather(*(self._readiness_of(w) for w in workers)))
        if not self.fleet_started and all(answer is None for answer in answers):
            self.fleet_started = True
            log.info("all %d workers ready", self.count)
        return answers

    async def _probe_forever(self) -> None:
        while True:
            await self._probe()
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)

    # --- the admin app ------------------------------------------------------

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        for prefix in ("/connections", "/console", "/alerts"):
            app.router.add_route("*", prefix, self._forward_operator)
            app.router.add_route("*", prefix + "/{tail:.*}", self._forward_operator)
        return app

    def _pick_operator_worker(self) -> _Worker | None:
        """The worker the operator's requests go to: the same one while it lives,
        since a login session is held in that worker's memory; else a ready one."""
        if self._operator_worker is not None:
            worker, pid = self._operator_worker
            if worker.alive and worker.process is not None and worker.process.pid == pid:
                return worker
            self._operator_worker = None
        for worker in self._workers:
            if worker.admin_socket is not None and worker.alive and worker.ready:
                assert worker.process is not None
                self._operator_worker = (worker, worker.process.pid)
                return worker
        return None

    async def _forward_operator(self, request: web.Request) -> web.StreamResponse:
        """Pass an operator's request to one worker and its answer back, as is.

        The worker authenticates it (operator token, staff login) and its
        Connections service covers every worker. Host and Origin go through
        unchanged (the pages check that a POST is same-origin).
        """
        worker = self._pick_operator_worker()
        if worker is None:
            return web.json_response(
                {"error": "no worker is ready to answer; try again"}, status=503
            )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append((FORWARDED_FOR, request.remote or "?"))
        body = await request.read()
        try:
            async with self._session(worker).request(
                request.method,
                f"http://worker{request.rel_url}",
                headers=headers,
                data=body or None,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS),
            ) as answer:
                payload = await answer.read()
                back = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP]
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._operator_worker = None
            return web.json_response({"error": f"{worker.name} did not answer"}, status=502)
        response = web.Response(status=answer.status, body=payload)
        for key, value in back:
            response.headers.add(key, value)
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": self.count})

    async def _readyz(self, request: web.Request) -> web.Response:
        answers = await self._probe()
        reason = fleet_readiness(answers, self.stopping)
        if reason is not None:
            return web.json_response({"status": "unavailable", "reason": reason}, status=503)
        return web.json_response({"status": "ready", "workers": self.count})

    async def _metrics(self, request: web.Request) -> web.Response:
        workers = [w for w in self._workers if w.admin_socket is not None]
        answers = await asyncio.gather(*(self._ask(w, "/metrics") for w in workers))
        texts: dict[str, str] = {}
        for worker, answer in zip(workers, answers, strict=True):
            if answer is not None and answer[0] == 200:
                texts[str(worker.index)] = answer[1]
        body = render(texts, self._own_metrics(workers, texts))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _own_metrics(self, workers: list[_Worker], answered: Mapping[str, str]) -> str:
        lines = [
            "# HELP rabbitgate_workers Worker processes the supervisor keeps.",
            "# TYPE rabbitgate_workers gauge",
            f"rabbitgate_workers {self.count}",
            "# HELP rabbitgate_worker_up 1 while the worker answered this scrape.",
            "# TYPE rabbitgate_worker_up gauge",
        ]
        lines += [
            f'rabbitgate_worker_up{{worker="{w.index}"}} {int(str(w.index) in answered)}'
            for w in workers
        ]
        lines += [
            "# HELP rabbitgate_worker_restarts_total Times the worker ended and was started again.",
            "# TYPE rabbitgate_worker_restarts_total counter",
        ]
        lines += [
            f'rabbitgate_worker_restarts_total{{worker="{w.index}"}} {w.restarts}' for w in workers
        ]
        return "\n".join(lines) + "\n"


def _reason(body: str) -> str:
    try:
        return str(json.loads(body).get("reason") or "not ready")
    except (ValueError, AttributeError):
        return "not ready"


def fleet_problem(settings: Settings, count: int) -> str | None:
    """Why ``settings`` cannot run as ``count`` workers, or None (none so far:
    the anomaly detector runs once for the fleet, see ``fleet_children``)."""
    return None


def fleet_children(settings: Settings, config: str | None) -> list[ChildSpec]:
    """The processes the fleet needs besides its workers.

    The anomaly detector must not run once per worker (N detectors would each
    see 1/N of the traffic and raise N copies of a fleet-wide alert): with
    anomaly detection on, the workers run in fleet mode (``anomaly.fleet``:
    they publish their traffic events, the CLI sets it for a worker) and the
    supervisor keeps one ``rabbitgate detector`` with the same configuration
    file. (Settings given to ``serve`` as flags do not reach it; the
    environment does.)
    """
    if not settings.anomaly.enabled:
        return []
    argv = ["detector"] + (["--config", config] if config else [])
    return [ChildSpec("anomaly detector", tuple(argv))]
