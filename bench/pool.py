"""Client worker processes, driven from the controller over pipes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from bench.proc import cpu_seconds

_CONTEXT = multiprocessing.get_context("spawn")


class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(self, target: Callable[..., None], spec: dict[str, Any]) -> None:
        self.spec = spec
        self.pipe, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=target, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: Any) -> None:
        self.pipe.send(command)

    def receive(self, timeout: float) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while not self.pipe.poll(0.2):
            if not self.process.is_alive():
                raise WorkerError(f"client worker {self.spec.get('name')} died")
            if time.monotonic() > deadline:
                raise WorkerError(f"client worker {self.spec.get('name')} did not answer in time")
        answer: tuple[Any, ...] = self.pipe.recv()
        return answer

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.send("exit")
                self.receive(10)
            except (WorkerError, OSError, EOFError):
                pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Pool:
    """Several workers, commanded together."""

    def __init__(self, target: Callable[..., None], specs: list[dict[str, Any]]) -> None:
        self.workers = [Worker(target, spec) for spec in specs]

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def ask(self, *command: Any, timeout: float = 60) -> list[tuple[Any, ...]]:
        """Send ``command`` to every worker, then collect every answer."""
        for worker in self.workers:
            worker.send(*command)
        return [worker.receive(timeout) for worker in self.workers]

    def wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        answers = [worker.receive(timeout) for worker in self.workers]
        for answer in answers:
            if answer[0] != "ready":
                raise WorkerError(f"unexpected answer from a worker: {answer[0]}")
        return [answer[1] for answer in answers]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
