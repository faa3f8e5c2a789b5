"""The detector's worker process, as the gateway sees it: start, send, await, end.

A ``spawn`` child (never ``fork``: the gateway has threads and sockets) running
``anomaly.worker.serve``. Two one-way pipes; on the gateway's side one thread
writes (a slow child never blocks the event loop, and the loop only pickles
small batches) and one thread reads, unpickles and hands each answer to the
loop in order (``expect`` returns the future of the next answer).

The child's end of things:

* the gateway stops it with ``stop`` (a ``stop`` message, then SIGKILL if it
  does not exit in time);
* the gateway dies: the child reads end-of-file on its inbox and exits (only
  this process holds the writing end: pipes are not inherited by other
  children, ``spawn`` passes each child only its own);
* the child dies: the reading thread sees end-of-file, every awaited answer
  fails with ``WorkerGone`` and ``gone`` is set (the detector restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import queue
import threading
from collections import deque
from typing import Any

from anomaly.model import AnomalyModel
from anomaly.settings import AnomalySettings
from anomaly.worker import serve

log = logging.getLogger("rabbitgate.anomaly")

# Bytes waiting for the child beyond which batches of events are dropped (a
# child that stopped reading must not make the gateway's memory grow).
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
STOP_SECONDS = 10.0  # a stopping child may finish the window at hand, then is killed


class WorkerGone(Exception):
    """The worker process ended before it answered."""


class WorkerProcess:
    """One worker process. ``await start()`` first; ``await stop()`` at the end."""

    def __init__(self, settings: AnomalySettings, log_setup: tuple[str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        inbox, self._to_child = context.Pipe(duplex=False)
        self._from_child, outbox = context.Pipe(duplex=False)
        self._child_ends = (inbox, outbox)
        self.process = context.Process(
            target=serve,
            args=(settings, inbox, outbox, log_setup),
            name="rabbitgate-anomaly",
            daemon=True,
        )
        self.gone = asyncio.Event()  # set once: the child has ended (or could not start)
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._answers: deque[asyncio.Future[Any]] = deque()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return not self.gone.is_set()

    async def start(self) -> AnomalyModel | None:
        """Start the child; returns the model it loaded (None: it learns first).

        Raises ``WorkerGone`` if it died while loading."""
        self._loop = asyncio.get_running_loop()
        ready = self.expect()
        await asyncio.to_thread(self.process.start)
        self._pid = self.process.pid
        for end in self._child_ends:  # the child's now; ours would hide its end-of-file
            end.close()
        for target, name in ((self._write, "writer"), (self._read, "reader")):
            thread = threading.Thread(target=target, name=f"rabbitgate-anomaly-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        kind, model = await ready
        assert kind == "ready"
        return model  # type: ignore[no-any-return]

    def send(self, message: tuple[Any, ...]) -> bool:
        """Queue ``message`` for the child (pickled here, written by a thread).

        False when it was dropped: the child is gone, or far behind."""
        if self.gone.is_set():
            return False
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._backlog_lock:
            if self._backlog + len(data) > MAX_BACKLOG_BYTES:
                return False
            self._backlog += len(data)
        self._sends.put(data)
        return True

    def expect(self) -> asyncio.Future[Any]:
        """The future of the child's next answer (answers come in order)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.gone.is_set():
            future.set_exception(WorkerGone("the anomaly worker process is not running"))
            future.exception()
        else:
            self._answers.append(future)
        return future

    def kill(self) -> None:
        """End the child now (SIGKILL); ``gone`` follows."""
        with contextlib.suppress(Exception):
            self.process.kill()

    async def stop(self) -> None:
        """Ask the child to finish, wait a little, then kill it; release everything."""
        if self._closed:
            return
        if self._pid is not None and not self.gone.is_set():
            self.send(("stop",))
            await asyncio.to_thread(self.process.join, STOP_SECONDS)
        await self.close()

    async def close(self) -> None:
        """Kill the child if it still runs, join the threads, close the pipes."""
        if self._closed:
            return
        self._closed = True
        if self._pid is not None:
            if self.process.is_alive():
                self.kill()
            await asyncio.to_thread(self.process.join)
        self._sends.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._to_child.close()
        self._from_child.close()
        for end in self._child_ends:
            end.close()
        with contextlib.suppress(ValueError):
            self.process.close()

    # --- the two threads --------------------------------------------------------

    def _write(self) -> None:
        while True:
            data = self._sends.get()
            if data is None:
                return
            with self._backlog_lock:
                self._backlog -= len(data)
            try:
                self._to_child.send_bytes(data)
            except (OSError, ValueError):
                pass  # the child is gone: the reader says so; drain until told to stop

    def _read(self) -> None:
        assert self._loop is not None
        while True:
            try:
                message = pickle.loads(self._from_child.recv_bytes())
            except (EOFError, OSError, ValueError):
                self._call(self._ended)
                return
            self._call(self._answer, message)

    def _call(self, function: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(function, *args)

    def _answer(self, message: Any) -> None:
        if not self._answers:
            return  # a stopping child's answer to a window nobody waits for
        future = self._answers.popleft()
        if not future.done():
            future.set_result(message)

    def _ended(self) -> None:
        self.gone.set()
        while self._answers:
            future = self._answers.popleft()
            if not future.done():
                future.set_exception(WorkerGone("the anomaly worker process ended"))
                future.exception()  # awaited or not (a window of a stopping detector): no warning
